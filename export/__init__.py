"""dsmd.export: a student or teacher checkpoint -> encoder bundle (ONNX image and text encoders).

    encoders.py   what export needs of a model (`Encoders`): of a student, an in-memory model, or
                  any registered teacher kind (each kind's own `export_encoders`)
    onnx.py       the generic machinery: ONNX graphs, parity and recall checks, INT8 / fp16 variants
    cli.py        `dsmd export student|teacher|verify`

The bundle carries the `dsmd.preprocess.PreprocessConfig` the model was trained with, so serving
preprocesses exactly as training did; parity with PyTorch and recall are checked at export.
The bundle's runtime (`dsmd.bundle`) needs no torch.
"""
