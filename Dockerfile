# syntax=docker/dockerfile:1
# Two targets:
#   serve  (default) the search server: ONNX Runtime, faiss, FastAPI; no torch. Mount an encoder
#          bundle and an index (read-write: SQLite keeps its WAL files beside the index).
#            docker build -t dsmd-serve .
#            docker run -p 8000:8000 -v $PWD/artifacts:/data dsmd-serve
#   train  the training tools (torch, timm, transformers): dsmd distill / export / index.
#            docker build --target train -t dsmd-train .
#            docker run --gpus all -v $PWD:/work -w /work dsmd-train dsmd distill --config configs/paper.json ...

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --uid 10001 --create-home dsmd
WORKDIR /app

FROM base AS serve
COPY requirements-serve.txt .
RUN pip install -r requirements-serve.txt
COPY dsmd/ dsmd/
COPY index/ index/
COPY serve/ serve/
ENV DSMD_BUNDLE=/data/bundle DSMD_INDEX=/data/index
USER dsmd
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"
CMD ["python", "-m", "dsmd.cli", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS train
COPY pyproject.toml README.md ./
COPY dsmd/ dsmd/
COPY distill/ distill/
COPY export/ export/
COPY index/ index/
COPY serve/ serve/
COPY configs/ configs/
RUN pip install .
USER dsmd
ENTRYPOINT []
CMD ["dsmd", "--help"]

FROM serve
