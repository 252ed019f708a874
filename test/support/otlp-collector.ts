import http from 'node:http';

/** What a stand-in collector was sent: the OTLP path (`/v1/traces`, `/v1/metrics`) and the JSON body. */
export interface CollectedBody {
  path: string;
  text: string;
  body: unknown;
}

export interface OtlpCollector {
  url: string;
  bodies: CollectedBody[];
  close: () => void;
}

/** A stand-in OpenTelemetry collector: keeps every OTLP/JSON body it is sent (OTEL_EXPORTER_OTLP_PROTOCOL=http/json). */
export function startOtlpCollector(): Promise<OtlpCollector> {
  const bodies: CollectedBody[] = [];
  const server = http.createServer((request, response) => {
    const chunks: Buffer[] = [];
    request.on('data', (chunk: Buffer) => chunks.push(chunk));
    request.on('end', () => {
      const text = Buffer.concat(chunks).toString('utf8');
      bodies.push({ path: request.url ?? '', text, body: JSON.parse(text || '{}') as unknown });
      response.writeHead(200, { 'content-type': 'application/json' }).end('{}');
    });
  });
  return new Promise((resolve) =>
    server.listen(0, '127.0.0.1', () => resolve({ url: `http://127.0.0.1:${(server.address() as { port: number }).port}`, bodies, close: () => server.close() })),
  );
}
