# syntax=docker/dockerfile:1
# Two targets:
#   serve  (default) the search server: ONNX Runtime, FAISS, FastAPI; no torch. Its dependencies
#          come pinned with hashes from requirements-serve.lock, then the package itself as .[serve].
#          Mount an encoder bundle and an index under /data. A read-only mount (`:ro`) is served
#          read-only: search works, POST/DELETE /items answer 403. To allow writes the index folder
#          must be writable by the container's user, uid 10001 (SQLite keeps its WAL files beside the
#          index); a host folder owned by another user is read-only to it, with the same 403.
#            docker build -t dsmd-serve .
#            docker run -p 8000:8000 -v $PWD/artifacts:/data:ro dsmd-serve      # search only
#            sudo chown -R 10001 artifacts/index                                  # then, to allow writes:
#            docker run -p 8000:8000 -v $PWD/artifacts:/data dsmd-serve
#   train  the training tools (torch, timm, transformers): dsmd distill / export / index.
#            docker build --target train -t dsmd-train .
#            docker run --gpus all -v $PWD:/work -w /work dsmd-train dsmd distill --config configs/paper.json ...
# .dockerignore keeps the virtual environment, data, artifacts and runs out of the build context.

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --uid 10001 --create-home dsmd
WORKDIR /app
# What `pip install .` reads: the project file and the package folders (one namespace, dsmd.*).
COPY pyproject.toml README.md ./
COPY dsmd/ dsmd/
COPY distill/ distill/
COPY export/ export/
COPY index/ index/
COPY serve/ serve/

FROM base AS serve
COPY requirements-serve.lock .
RUN pip install --require-hashes -r requirements-serve.lock \
 && pip install --no-deps '.[serve]'
ENV DSMD_BUNDLE=/data/bundle DSMD_INDEX=/data/index
USER dsmd
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"
CMD ["dsmd", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS train
# torch and torchvision pinned by constraints.txt (the release line this project is tested on).
COPY constraints.txt ./
COPY configs/ configs/
RUN pip install -c constraints.txt '.[train]'
USER dsmd
ENTRYPOINT []
CMD ["dsmd", "--help"]

FROM serve
