FROM python:3.12-slim
RUN apt-get update && apt-get install -y --no-install-recommends nodejs npm && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt package.json package-lock.json ./
RUN pip install --no-cache-dir -r requirements.txt && npm ci --omit=dev --no-audit --no-fund
COPY . .
# collectstatic runs no system checks that need the production keys.
RUN LIFEBOAT_DEMO=1 python manage.py collectstatic --noinput
# Lifeboat runs as an unprivileged user; it writes only to its data directory (a volume) and,
# for a process server, to its own state directory (a volume per container).
RUN useradd --system --uid 10001 --home-dir /var/lib/lifeboat --shell /usr/sbin/nologin lifeboat \
    && mkdir -p /var/lib/lifeboat /var/lib/lifeboat-ps && chown lifeboat:lifeboat /var/lib/lifeboat /var/lib/lifeboat-ps
USER lifeboat
ENV LIFEBOAT_DATA_DIR=/var/lib/lifeboat
EXPOSE 8000 9443
