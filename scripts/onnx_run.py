#!/usr/bin/env python3
"""Test oracle for distill's ONNX export: checks models with ONNX's full checker and runs them in onnxruntime.

  onnx_run.py MANIFEST [--no-optimizations]

Each line of MANIFEST is `MODEL.onnx INPUT.bin N C H W OUTPUT.bin`: INPUT.bin holds N*C*H*W float32 values
(little-endian, C order); the model's first output is written to OUTPUT.bin the same way, and its shape printed.
One process for many models, so the tests pay onnxruntime's start-up once. Used by tests/onnx.rs; never part of
distill's own run-time path.
"""
import sys

import numpy as np
import onnx
import onnxruntime as ort


def main():
    manifest = sys.argv[1]
    options = ort.SessionOptions()
    if "--no-optimizations" in sys.argv[2:]:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with open(manifest) as f:
        for line in f:
            if not line.strip():
                continue
            model, inp, *shape, out = line.split()
            onnx.checker.check_model(model, full_check=True)
            session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            x = np.fromfile(inp, dtype="<f4").reshape([int(d) for d in shape])
            (y, *_) = session.run(None, {session.get_inputs()[0].name: x})
            y.astype("<f4").tofile(out)
            print(model, " ".join(str(d) for d in y.shape))


if __name__ == "__main__":
    main()
