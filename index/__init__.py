"""index: image collections → FAISS index + SQLite metadata, without torch.

Not built yet (issue 5). It will read data sets with `dsmd.datasets` and open images with
`dsmd.images.open_image`, as the rest of the project does.
"""
