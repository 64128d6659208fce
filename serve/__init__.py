"""serve: the HTTP search server and its web page, without torch.

Not built yet (issue 6).
"""
