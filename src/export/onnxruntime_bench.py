"""Measures ONNX models in onnxruntime for distill's deployment report (distill::export::deploy).

  python onnxruntime_bench.py REQUEST.json RESULT.json

REQUEST names the models, the test images and labels (raw little-endian float32 / int64 files), the batch sizes,
the warm-up and timed runs, the thread count and whether graph optimizations are on. RESULT gets, per model, the
median latency in milliseconds per batch size (each run is one session.run on a batch cut from the test images)
and the top-1 accuracy over the test set. distill writes this file next to the report; it is not a library
dependency, only the way the report reaches onnxruntime (from the project's .venv).
"""
import json
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort


def main():
    with open(sys.argv[1]) as f:
        req = json.load(f)
    images = np.fromfile(req["images"], dtype="<f4").reshape(req["images_shape"])
    labels = np.fromfile(req["labels"], dtype="<i8")
    options = ort.SessionOptions()
    options.intra_op_num_threads = req["threads"]
    options.inter_op_num_threads = 1
    if not req["optimize"]:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    results = []
    for m in req["models"]:
        session = ort.InferenceSession(m["path"], options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        latency = {}
        for batch in req["batch_sizes"]:
            x = np.ascontiguousarray(images[:batch])
            for _ in range(req["warmup"]):
                session.run(None, {name: x})
            times = []
            for _ in range(req["runs"]):
                start = time.perf_counter()
                session.run(None, {name: x})
                times.append(time.perf_counter() - start)
            latency[str(batch)] = 1000.0 * statistics.median(times)
        correct = 0
        for start in range(0, len(labels), 256):
            (y, *_) = session.run(None, {name: np.ascontiguousarray(images[start:start + 256])})
            correct += int((y.argmax(axis=1) == labels[start:start + 256]).sum())
        results.append({"label": m["label"], "latency_ms": latency, "top1": 100.0 * correct / len(labels)})
    with open(sys.argv[2], "w") as f:
        json.dump({"onnxruntime": ort.__version__, "models": results}, f)


if __name__ == "__main__":
    main()
