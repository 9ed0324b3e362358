# One image for every process: `segmentation api | worker | relay | ttl | migrate | topics`.

FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
# Dependencies first, so a code change does not reinstall them.
COPY pyproject.toml ./
RUN /opt/venv/bin/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
        > requirements.txt \
    && /opt/venv/bin/pip install -r requirements.txt
COPY schemas ./schemas
COPY service ./service
COPY consumers ./consumers
COPY producers ./producers
# A wheel of the project itself, runtime dependencies only (no [dev] extras).
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-deps /wheels/*.whl

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HTTP_HOST=0.0.0.0
RUN groupadd --system --gid 10001 segmentation \
    && useradd --system --uid 10001 --gid segmentation --no-create-home --shell /usr/sbin/nologin segmentation
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["segmentation"]
CMD ["api"]
