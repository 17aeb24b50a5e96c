"""The training engine: one loop for plain training and every distillation method, single process or torchrun/DDP."""
from __future__ import annotations

import contextlib
import csv
import io
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import (
    RUN_FORMAT,
    STUDENT,
    STUDENT_FORMAT,
    atomic_save,
    atomic_write_text,
    load_checkpoint,
    provenance,
)
from ..data import resident
from ..data.checks import SKIPPED_FILE
from ..data.folders import set_skip_log, skipped_images
from ..data.loaders import build_datasets, build_mixup, dataset_targets, eval_loader, train_loader
from ..distill import Distiller, get_method_class
from ..distill.base import TrainingData
from ..distill.teacher_cache import cache_dir, dataset_digest, prepare_teacher_cache
from ..distributed import DistEnv, all_reduce_sum, barrier, init_distributed, shutdown
from ..errors import UserError
from ..models import create_model
from ..recipe import Recipe, check_files, distill_params, migrate_data_section, resolved_recipe
from .acceleration import Acceleration
from .evaluate import evaluate
from .run_lock import check_run_folder_free, run_folder_lock
from .timing import PhaseClock

LAST = "last.pt"
METRICS = "metrics.csv"
REFRESH = 10  # progress-bar refresh interval in steps


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Every epoch starts from a seed of its own, so a resumed run replays exactly what an uninterrupted one does."""
    return seed + 100_003 * (epoch + 1) + 1_009 * rank


def param_groups(distiller: Distiller, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and the tokens/embeddings timm models list in no_weight_decay()."""
    no_wd_names = getattr(distiller.student, "no_weight_decay", lambda: set())()
    skip = {f"student.{name}" for name in no_wd_names}
    decay, no_decay = [], []
    for name, param in distiller.trainable_parameters():
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


class Trainer:
    """Builds everything a recipe names and runs it; `fit()` returns the final metrics."""

    def __init__(self, recipe: Recipe, recipe_file: str | None = None, resume: bool | str = False,
                 overwrite: bool = False, console: Console | None = None):
        self.recipe = recipe
        self.env: DistEnv = init_distributed(recipe.device)
        self.console = console or Console(stderr=True)
        self.run_dir = recipe.run_dir
        self.start_epoch, self.global_step, self.history = 0, 0, []
        if self.env.is_main:
            check_run_folder_free(self.run_dir)
        resume_state = self._resume_state(resume, overwrite)
        check_files(recipe, recipe_file)

        seed_everything(recipe.optim.seed)  # identical initial weights on every rank
        self.train_set, self.val_set, self.info = build_datasets(recipe.data, recipe.optim.seed)
        self.image_sources = (self.train_set.dataset, self.val_set.dataset)  # before a teacher cache wraps them
        set_skip_log(self.run_dir / SKIPPED_FILE, *self.image_sources)
        self.distiller = self._build_distiller().to(self.env.device)
        self.resident, data_note = resident.load(recipe.data, self.train_set.dataset, self.env.device)
        self.acceleration = Acceleration.from_recipe(recipe.optim, self.env.device, {
            "student": self.distiller.student, **{f"teacher {i}": t for i, t in enumerate(self.distiller.teachers)}})
        if recipe.teacher_cache.enabled:  # the student then trains on the stored views the outputs belong to
            self.train_set = prepare_teacher_cache(self.distiller, self.train_set, self.info, recipe, self.env,
                                                   self.console, self.resident)
        self.batch_size = self._per_process_batch()
        self.train_loader, self.val_loader = self._loaders()
        self.acceleration.notes.append(data_note)
        if len(self.train_loader) == 0:
            raise UserError(f"optim.batch_size={recipe.optim.batch_size} is larger than the training set "
                            f"({len(self.train_set)} images), so an epoch has no full batch. Lower optim.batch_size.")
        self.mixup = build_mixup(recipe.data, self.info.num_classes)
        if self.mixup is not None and self.batch_size % 2:
            raise UserError(f"Mixup/cutmix pair images within a batch, so the per-process batch must be even, not "
                            f"{self.batch_size}. Change `optim.batch_size` or disable `data.augment.mixup`/`cutmix`.")
        self.distiller.prepare(self._training_data())

        o = recipe.optim
        self.optimizer = create_optimizer_v2(param_groups(self.distiller, o.weight_decay), opt=o.optimizer, lr=o.lr,
                                             weight_decay=o.weight_decay, momentum=o.momentum)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=o.schedule, num_epochs=o.epochs, decay_epochs=o.decay_epochs,
            decay_milestones=o.decay_milestones, decay_rate=o.decay_rate, min_lr=o.min_lr, warmup_lr=o.warmup_lr,
            warmup_epochs=o.warmup_epochs, step_on_epochs=False, updates_per_epoch=len(self.train_loader))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.acceleration.amp_dtype == torch.float16)
        if resume_state is not None:
            self._load_resume_state(resume_state)
        if self.acceleration.compile:
            self.distiller.student.compile()  # in place: state_dict keys, checkpoints and DDP stay as they are
        self.model = self._wrap_ddp()
        self.clock = PhaseClock(self.env.device, self.distiller.teachers)
        self.compile_s: float | None = None  # the first step's excess over the steady state, once measured

    # ----------------------------------------------------------------------------------------- setup
    def _build_distiller(self) -> Distiller:
        r, n = self.recipe, self.info.num_classes
        student = create_model(r.student.name, n, r.student.pretrained, r.student.checkpoint, r.student.kwargs,
                               field="student.name")
        teachers = [create_model(t.name, n, t.pretrained, t.checkpoint, t.kwargs, field=f"teachers.{i}.name")
                    for i, t in enumerate(r.teachers)]
        cls = get_method_class(r.distill.method or "none")
        return cls(student, teachers, distill_params(r), n, label_smoothing=r.data.augment.label_smoothing,
                   mean=self.info.mean, std=self.info.std, img_size=self.info.img_size)

    def _training_data(self) -> TrainingData:
        """What Distiller.prepare may read: every image's class, epochs of training batches, the cache folder."""
        r = self.recipe
        images = self.image_sources[0]

        def epoch_batches(epoch: int) -> Any:
            self.train_loader.sampler.set_epoch(epoch)
            return self.train_loader

        def fingerprint() -> dict[str, Any]:
            return {"images": dataset_digest(images.dataset), "augment": r.data.augment.model_dump(mode="json"),
                    "img_size": self.info.img_size, "batch_size": r.optim.batch_size, "seed": r.optim.seed}

        return TrainingData(targets=dataset_targets(images), epoch_batches=epoch_batches, fingerprint=fingerprint,
                            cache_dir=cache_dir(r.teacher_cache), console=self.console if self.env.is_main else None)

    def _loaders(self) -> tuple[Any, Any]:
        """Train and val loaders: loader processes, or batches built from resident images on the device."""
        r, env, info = self.recipe, self.env, self.info
        loader_args = dict(num_workers=r.data.num_workers, pin_memory=env.device.type == "cuda")
        if self.resident is None:
            train = train_loader(self.train_set, self.batch_size, seed=r.optim.seed, rank=env.rank,
                                 world_size=env.world_size, **loader_args)
        else:
            train = resident.train_loader(self.resident, self.train_set, r.data, info.mean, info.std,
                                          self.batch_size, r.optim.seed, env.rank, env.world_size)
        val_raw = self.val_set.dataset
        if self.resident is not None and resident.eval_is_normalise_only(r.data, np.asarray(val_raw[0][0]).shape[:2]):
            with contextlib.suppress(resident.MixedSizes):  # then the loader path below
                val_images = resident.ResidentImages.decode(val_raw, env.device, r.data.num_workers)
                return train, resident.eval_loader(val_images, info.mean, info.std, self.batch_size, env.rank,
                                                   env.world_size)
        return train, eval_loader(self.val_set, self.batch_size, rank=env.rank, world_size=env.world_size,
                                  **loader_args)

    def _per_process_batch(self) -> int:
        global_batch, world = self.recipe.optim.batch_size, self.env.world_size
        if global_batch % world:
            raise UserError(f"optim.batch_size={global_batch} is the global batch and must split evenly over "
                            f"{world} processes. Use a multiple of {world}.")
        return global_batch // world

    def _wrap_ddp(self) -> nn.Module:
        if not self.env.distributed:
            return self.distiller
        prefixes = self.distiller.ddp_ignored_prefixes()
        ignored = [name for name, _ in [*self.distiller.named_parameters(), *self.distiller.named_buffers()]
                   if name.startswith(prefixes)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.distiller, ignored)
        device_ids = [self.env.local_rank] if self.env.device.type == "cuda" else None
        return DistributedDataParallel(self.distiller, device_ids=device_ids)

    def _resume_state(self, resume: bool | str, overwrite: bool) -> dict[str, Any] | None:
        last = self.run_dir / LAST
        if not resume:
            if last.exists() and not overwrite:
                raise UserError(f"The run folder {self.run_dir} already holds a run ({last}). Continue it with "
                                "--resume, start over in it with --overwrite, or pick another `output.dir` "
                                "(e.g. output.dir=runs/new).")
            return None
        if not last.exists():
            if resume == "auto":
                return None
            raise UserError(f"Nothing to resume: {last} does not exist. Check `output.dir` (the recipe writes to "
                            f"{self.run_dir}), or drop --resume to start a new run.")
        state = load_checkpoint(last)
        if not isinstance(state, dict) or state.get("format") != RUN_FORMAT:
            raise UserError(f"{last} is not a kd2deploy run checkpoint. Remove it or pick another `output.dir`.")
        saved_data = state["recipe"]["data"]
        if "split_rng" not in saved_data:  # recorded before kd2deploy 0.2: keep the split it trained on
            state["recipe"]["data"] = migrate_data_section(saved_data)
            self.recipe.data.split_rng = state["recipe"]["data"]["split_rng"]
        self._warn_recipe_changes(state["recipe"])
        return state

    def _warn_recipe_changes(self, saved: dict[str, Any]) -> None:
        def flat(d: Any, prefix: str = "") -> dict[str, Any]:
            if isinstance(d, dict):
                return {k: v for key, val in d.items() for k, v in flat(val, f"{prefix}{key}.").items()}
            return {prefix[:-1]: d}
        now, before = flat(resolved_recipe(self.recipe)), flat(saved)
        changed = sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))
        if changed and self.env.is_main:
            self.console.print(f"[yellow]Resuming with a changed recipe: {', '.join(changed)}[/yellow]")

    def _load_resume_state(self, state: dict[str, Any]) -> None:
        self.distiller.load_training_state(state["distiller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.global_step = state["epoch"], state["global_step"]
        self.history = state["history"]
        if self.env.is_main:
            self.console.print(f"Resuming {self.run_dir} after epoch {self.start_epoch}/{self.recipe.optim.epochs}")

    def _list_skipped_images(self) -> None:
        """One warning for the unreadable images the image folders left out, and their list in the run folder
        (which decode failures met during training are appended to)."""
        skipped = skipped_images(*self.image_sources)
        if not skipped:
            return
        path = self.run_dir / SKIPPED_FILE
        earlier = path.read_text().splitlines(keepends=True) if path.exists() else []  # decode failures so far
        lines = [f"{p}\t{why}\n" for p, why in skipped]
        atomic_write_text(path, "".join(dict.fromkeys(lines + earlier)))
        names = ", ".join(Path(p).name for p, _ in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        self.console.print(f"[yellow]warning: left out {len(skipped)} unreadable image(s) ({names}{more}); the list "
                           f"is in {path}[/yellow]")

    # ----------------------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        with run_folder_lock(self.run_dir) if self.env.is_main else contextlib.nullcontext():
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        r = self.recipe
        if self.env.is_main:
            atomic_write_text(self.run_dir / "recipe.yaml", yaml.safe_dump(resolved_recipe(r), sort_keys=False))
            self._list_skipped_images()
            self._describe()
        writer = self._tensorboard()
        try:
            for epoch in range(self.start_epoch, r.optim.epochs):
                row = self._train_epoch(epoch)
                val = evaluate(self.distiller.student, self.val_loader, self.env, self.acceleration.eval_autocast(),
                               self.acceleration.layout)
                row.update({"val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
                            "val_images": val["count"]})
                self.history.append(row)
                if self.env.is_main:
                    self._log_epoch(row, writer)
                    if (epoch + 1) % r.output.save_every == 0 or epoch + 1 == r.optim.epochs:
                        self._save_run_checkpoint(epoch + 1)
                barrier(self.env)
            if self.env.is_main:
                if self.start_epoch < r.optim.epochs or not (self.run_dir / STUDENT).exists():
                    self._save_student()
                self.console.print(f"Student checkpoint: {self.run_dir / STUDENT}")
        finally:
            if writer is not None:
                writer.close()
            barrier(self.env)
            shutdown(self.env)
        return self.history[-1] if self.history else {}

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        seed_everything(epoch_seed(self.recipe.optim.seed, epoch, self.env.rank))
        self.train_loader.sampler.set_epoch(epoch)
        if hasattr(self.train_set, "set_epoch"):  # stored-view datasets pick each image's view per epoch
            self.train_set.set_epoch(epoch)
        self.model.train()
        threads_note = self.acceleration.set_threads()
        if threads_note and self.env.is_main:
            self.console.print(threads_note)
        # running sums stay on the device; reading them (a GPU sync) happens only every REFRESH steps
        sums: dict[str, torch.Tensor] = {}
        count, start = 0, time.perf_counter()
        first_step_s = 0.0
        self.clock.start_epoch()
        with self._progress() as progress:
            task = progress.add_task("train", total=len(self.train_loader), epoch=epoch + 1, stats="")
            for step, (images, targets, indices) in enumerate(self.train_loader, 1):
                self.clock.start_step(step)
                values = self._train_step(images, targets, indices)
                if step == 1:
                    first_step_s = time.perf_counter() - start
                n = len(images)
                for name, value in values.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float() * n
                count += n
                if step % REFRESH == 0 or step == len(self.train_loader):
                    self._check_finite(sums["loss"], epoch)
                    progress.update(task, completed=step, stats=(
                        f"loss {sums['loss'].item() / count:.3f}  acc {100 * sums['correct'].item() / count:.1f}%  "
                        f"{count * self.env.world_size / (time.perf_counter() - start):.0f} img/s"))
        self.scheduler.step(epoch + 1)
        self.clock.lap("optimizer")
        elapsed = time.perf_counter() - start
        totals = all_reduce_sum({"count": count, **{k: v.item() for k, v in sums.items()}}, self.env)
        count = totals.pop("count")
        row = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[-1]["lr"],
               "train_loss": totals.pop("loss") / count, "train_top1": 100 * totals.pop("correct") / count}
        row.update({f"loss_{k}": v / count for k, v in totals.items()})
        row.update({"train_images": int(count), "images_per_s": count / elapsed, "epoch_s": elapsed})
        steps = len(self.train_loader)
        if self.acceleration.compile and self.compile_s is None and steps > 1:
            # the process's first step compiles: its excess over a steady-state step is the compile time
            steady_step_s = (elapsed - first_step_s) / (steps - 1)
            self.compile_s = max(0.0, first_step_s - steady_step_s)
            row.update({"compile_s": self.compile_s, "steady_images_per_s": count / (steps * steady_step_s)})
            if self.env.is_main:
                self.console.print(f"compile: {self.compile_s:.1f} s in the first step; steady state "
                                   f"{row['steady_images_per_s']:.0f} img/s")
        row.update(self.clock.epoch_split(elapsed))
        if self.env.device.type == "cpu":
            row["threads"] = self.acceleration.threads
        return row

    def _train_step(self, images: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
        """One optimizer step; returns per-batch scalars (loss, accuracy as 'correct', the method's terms)."""
        images = images.to(self.env.device, non_blocking=True)
        targets = targets.to(self.env.device, non_blocking=True)
        hard_targets = targets
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
            hard_targets = targets.argmax(dim=-1)
        images = self.acceleration.layout(images)
        self.clock.lap("data")
        self.distiller.progress = self.global_step / (self.recipe.optim.epochs * len(self.train_loader))
        with self.acceleration.forward_context():
            output = self.model(images, targets, indices)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(output.loss).backward()
        self.clock.lap("student")
        if self.recipe.optim.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.recipe.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.global_step += 1
        self.scheduler.step_update(self.global_step)
        extra = self.distiller.on_step_end(self.global_step, output)
        self.clock.lap("optimizer")
        correct = (output.logits.argmax(dim=-1) == hard_targets).float().mean()
        return {"loss": output.loss, "correct": correct, **output.terms,
                **{k: torch.as_tensor(v) for k, v in extra.items()}}

    def _check_finite(self, loss_sum: torch.Tensor, epoch: int) -> None:
        if not torch.isfinite(loss_sum):
            raise UserError(f"The training loss became {loss_sum.item()} in epoch {epoch + 1} (by step "
                            f"{self.global_step}). Lower `optim.lr`, set `optim.clip_grad`, or disable `optim.amp`.")

    def _progress(self) -> Progress:
        return Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
                        console=self.console, disable=not self.env.is_main, transient=False)

    # ----------------------------------------------------------------------------------------- outputs
    def _describe(self) -> None:
        r = self.recipe
        teachers = ", ".join(t.name for t in r.teachers) or "none"
        self.console.print(
            f"[bold]{r.name}[/bold]: student {r.student.name}, teachers {teachers}, method {r.distill.method}, "
            f"{len(self.train_set)} train / {len(self.val_set)} val images ({self.info.dataset}), "
            f"{r.optim.epochs} epochs, global batch {r.optim.batch_size} over {self.env.world_size} process(es) "
            f"on {self.env.device}. Run folder: {self.run_dir}")
        for note in self.acceleration.notes:
            self.console.print(f"  {note}")

    def _log_epoch(self, row: dict[str, Any], writer: Any) -> None:
        self.console.print(
            f"epoch {row['epoch']}/{self.recipe.optim.epochs}  train loss {row['train_loss']:.4f}  "
            f"train top-1 {row['train_top1']:.2f}%  val top-1 {row['val_top1']:.2f}%  "
            f"{row['images_per_s']:.0f} img/s  lr {row['lr']:.4g}")
        keys = list(dict.fromkeys(k for r in self.history for k in r))
        buffer = io.StringIO()
        csv_writer = csv.DictWriter(buffer, fieldnames=keys)
        csv_writer.writeheader()
        csv_writer.writerows(self.history)
        atomic_write_text(self.run_dir / METRICS, buffer.getvalue())
        if writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    writer.add_scalar(key, value, row["epoch"])

    def _tensorboard(self) -> Any:
        if not (self.env.is_main and self.recipe.output.tensorboard):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _save_run_checkpoint(self, epochs_done: int) -> None:
        atomic_save({
            "format": RUN_FORMAT, "epoch": epochs_done, "global_step": self.global_step,
            "recipe": resolved_recipe(self.recipe), "data": self.info.to_dict(), "history": self.history,
            "distiller": self.distiller.training_state(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), **provenance(),
        }, self.run_dir / LAST)

    def _save_student(self) -> None:
        """The run's deployable artifact: the student's weights and what is needed to rebuild and feed it."""
        s = self.recipe.student
        atomic_save({
            "format": STUDENT_FORMAT,
            "model": {"name": s.name, "num_classes": self.info.num_classes, "kwargs": s.kwargs},
            "state_dict": self.distiller.student.state_dict(), "data": self.info.to_dict(),
            "recipe": resolved_recipe(self.recipe), "method": self.recipe.distill.method,
            "metrics": self.history[-1] if self.history else {}, "history": self.history,
            "training": self.acceleration.record(), **provenance(),
        }, self.run_dir / STUDENT)


def train(recipe: Recipe, recipe_file: str | None = None, resume: bool | str = False, overwrite: bool = False,
          console: Console | None = None) -> dict[str, Any]:
    return Trainer(recipe, recipe_file, resume=resume, overwrite=overwrite, console=console).fit()
