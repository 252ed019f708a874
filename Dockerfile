# The production image: `npm start` (server.ts: the proxy fast path, Next for the rest) on Node 24,
# as a non-root user, with production dependencies only. BASE_IMAGE must be a Debian-like image
# with Node 24 and npm; `npm run test:image` builds one from Debian packages where official images
# cannot be pulled.
ARG BASE_IMAGE=node:24-bookworm-slim

FROM ${BASE_IMAGE} AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY . .
RUN npm run build

FROM ${BASE_IMAGE} AS production-dependencies
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund

FROM ${BASE_IMAGE}
ENV NODE_ENV=production PORT=3000 HOSTNAME=0.0.0.0
WORKDIR /app
RUN groupadd --system gatehouse && useradd --system --gid gatehouse --home-dir /app --shell /usr/sbin/nologin gatehouse
COPY --from=production-dependencies /app/node_modules ./node_modules
COPY --from=build /app/.next ./.next
COPY package.json next.config.mjs server.ts ./
COPY lib ./lib
USER gatehouse
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["node", "-e", "fetch(`http://127.0.0.1:${process.env.PORT}/api/health?probe=ready`).then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
CMD ["npm", "start"]
