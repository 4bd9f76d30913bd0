# One image for the worker (`flowfleet worker ...`) and the operator (`flowfleet operator`,
# from the `operator` extra installed below; the Helm chart runs it). Build:
# docker build -t flowfleet .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY operator ./operator
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[operator]"

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PREFECT_HOME=/tmp/prefect
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# A numeric non-root user, so runAsNonRoot admission can verify it without /etc/passwd.
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["flowfleet"]
CMD ["worker", "--help"]
