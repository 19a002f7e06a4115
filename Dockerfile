# restyle's image: Ray (Python 3.11, CUDA) with restyle and its pinned dependencies.
#
#   docker build -t ghcr.io/OWNER/restyle:0.1.0 .
#
# The tag is the `version` in pyproject.toml; cluster/ refers to the image by that tag.
# No model weights are baked in: checkpoints come from s3:// prefixes staged per node into
# RESTYLE_CACHE, or from a Hugging Face cache under HF_HOME, both on the /models volume.

# The Ray version matches `ray==` in requirements.lock.
FROM rayproject/ray:2.60.0-py311-gpu

# Where the CUDA build of torch comes from. requirements.lock pins `torch==2.13.0` with no local
# version label, and such a pin matches every build of 2.13.0, so `-c requirements.lock` accepts
# 2.13.0+cu128 from this index (pip prefers it to PyPI's 2.13.0: a local label sorts higher).
# The lock itself was made on CPU machines and lists no nvidia-* wheels; pip resolves those
# torch dependencies from the index. The Ray image ships no torch of its own.
# For a CPU-only image: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# The base image runs as the non-root user `ray` (uid 1000, group users); so does this one.
RUN mkdir -p /home/ray/restyle
WORKDIR /home/ray/restyle

# Dependencies first, from pyproject.toml and the lock only, so editing the code reuses this layer.
# boto3 (pinned by the lock) is for the Ray cluster launcher's AWS node provider, which runs in
# this image on the head node (cluster/cluster-launcher.yaml).
COPY --chown=ray:users pyproject.toml requirements.lock ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/restyle-dependencies.txt \
    && pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" -c requirements.lock \
        -r /tmp/restyle-dependencies.txt boto3 \
    && rm /tmp/restyle-dependencies.txt

# The project itself (README.md is its package description).
COPY --chown=ray:users README.md ./
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users operators ./operators
COPY --chown=ray:users configs ./configs
RUN pip install --no-cache-dir -c requirements.lock .

# Model caches live on a volume: mount a per-node disk here (cluster/ mounts a hostPath) so the
# actors on a node share one copy of each checkpoint.
USER root
RUN mkdir -p /models/hf /models/restyle && chown -R ray:users /models
USER ray
ENV HF_HOME=/models/hf \
    RESTYLE_CACHE=/models/restyle
VOLUME /models
