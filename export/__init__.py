"""export: student checkpoint → encoder bundle (ONNX image and text encoders).

Not built yet (issue 4). The bundle will carry the `dsmd.preprocess.PreprocessCfg` that the
student was trained with, so serving preprocesses exactly as training did.
"""
