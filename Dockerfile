# One image for every Bulwark process; docker-compose.yml picks the Procfile entry.
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 bulwark
WORKDIR /app
COPY pyproject.toml README.md Procfile ./
COPY policies ./policies
COPY workers ./workers
COPY tasks ./tasks
RUN pip install --no-cache-dir .
# The keys volume (docker-compose.yml) starts as this folder: owned by the process user.
RUN mkdir /keys && chown bulwark /keys && chmod 700 /keys
USER bulwark
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["bulwark", "proc"]
