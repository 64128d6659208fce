"""dsmd.export: a student or teacher checkpoint -> encoder bundle (ONNX image and text encoders).

The bundle carries the `dsmd.preprocess.PreprocessCfg` the model was trained with, so serving
preprocesses exactly as training did; parity with PyTorch and recall are checked at export.
The bundle's runtime (`dsmd.bundle`) needs no torch.
"""
