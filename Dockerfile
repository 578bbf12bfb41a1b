# The generative asset service: one uvicorn process per container (scale out with more tasks).
FROM python:3.11.14-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    LOCAL_STORAGE_DIR=/app/data

# DejaVu lets generated images show accented, Greek and Cyrillic prompts instead of boxes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends fonts-dejavu-core \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

RUN useradd --system --uid 10001 --no-create-home app && mkdir data && chown app data
COPY gen_service.py settings.py body_limits.py upload_parser.py upload_stream.py storage.py render.py generators.py image_check.py errors.py logs.py openapi.json ./
COPY providers/ ./providers/
USER app

EXPOSE 8000
# Slim images have no curl; Python is there anyway.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['PORT'] + '/health', timeout=4)"]
# Exec form, so SIGTERM from ECS reaches uvicorn directly and it shuts down gracefully.
CMD ["python", "gen_service.py"]
