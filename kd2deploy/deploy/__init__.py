"""Deployment: the student to ONNX (`onnx`), every backend's artifacts, their verification and the manifest
(`pipeline`, `manifest`), for a target profile (`profiles`)."""
