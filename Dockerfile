# dayshift's container image: `dayshift serve`, `dayshift worker` and `dayshift migrate` from one
# image. Build: docker build -t registry.example.com/dayshift:0.1.0 .
#
# Stage 1 builds the release binary; stage 2 is Debian slim with what the built-in workflows
# run: pg_dump/pg_restore (PostgreSQL's client tools, every major version PGDG ships, since a
# backup uses the server's own major version), git (promotions), kubectl (kustomize
# rendering), CA certificates. It runs as an unprivileged user with a read-only root file
# system (the manifests mount /tmp).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p dayshift \
 && cp target/release/dayshift /dayshift

FROM debian:bookworm-slim
ARG PG_MAJORS="15 16 17"
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl gnupg git \
 && install -d /usr/share/postgresql-common/pgdg \
 && curl -fsSL -o /usr/share/postgresql-common/pgdg/apt.postgresql.org.asc https://www.postgresql.org/media/keys/ACCC4CF8.asc \
 && echo "deb [signed-by=/usr/share/postgresql-common/pgdg/apt.postgresql.org.asc] https://apt.postgresql.org/pub/repos/apt bookworm-pgdg main" \
      > /etc/apt/sources.list.d/pgdg.list \
 && apt-get update \
 && for v in $PG_MAJORS; do apt-get install -y --no-install-recommends "postgresql-client-$v"; done \
 && curl -fsSL -o /usr/local/bin/kubectl "https://dl.k8s.io/release/v1.33.0/bin/linux/amd64/kubectl" \
 && chmod 0755 /usr/local/bin/kubectl \
 && apt-get purge -y curl gnupg && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*
COPY --from=build /dayshift /usr/local/bin/dayshift
USER 65532:65532
ENV HOME=/tmp
EXPOSE 8080 9464
ENTRYPOINT ["/usr/local/bin/dayshift"]
CMD ["serve", "--listen", "0.0.0.0:8080"]
