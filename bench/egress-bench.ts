// The egress gateway's overhead per outbound request (issue 7), on loopback, against a plain fetch
// baseline in the same run: `npm run -s bench:egress [-- --requests N] [--json]`.
//
// One small HTTP server on 127.0.0.1 answers every request with 2 bytes. Sequential requests, each
// waited for, keep-alive everywhere. Measured, in turn (after a warm-up of each):
//   fetch        Node's global fetch (the baseline);
//   undici       undici's fetch with its own Agent: the transport the gateway uses, without checks;
//   gateway      the gateway: registry lookup, class and BAA checks, DNS-free address checks (an IP
//                literal), its own connector, no audit sink;
//   gateway+mem  the same with an in-memory audit sink (the cost of building the audit event);
//   gateway+audit the same with the real audit log on embedded PGlite (a durable, group-committed
//                append before each request: what a server pays for an audited egress).
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { Agent, fetch as undiciFetch } from 'undici';
import { EgressGateway } from '../src/egress/egress.ts';
import type { Vendor } from '../src/egress/vendor-registry.ts';
import { PgliteDriver } from '../src/store/pglite/pglite-driver.ts';
import { prepareAuditSchema } from '../src/audit/audit-migrations.ts';
import { AuditLog } from '../src/audit/audit-log.ts';

const args = process.argv.slice(2);
const json = args.includes('--json');
const nArg = args.indexOf('--requests');
const N = nArg >= 0 ? Number(args[nArg + 1]) : 3000;

const server = http.createServer((_req, res) => res.end('ok'));
server.keepAliveTimeout = 60_000;
const port = await new Promise<number>((r) =>
  server.listen(0, '127.0.0.1', () => r((server.address() as AddressInfo).port)),
);
const url = `http://127.0.0.1:${port}/hook`;

const vendor: Vendor = {
  vendorId: 'bench-vendor',
  name: 'bench vendor',
  kind: 'vendor',
  services: ['webhooks'],
  phiClass: 'full',
  baaState: 'active',
  expiresInDays: 365,
  endpoints: [{ endpointId: 'bench-ep', host: '127.0.0.1', port, protocol: 'http', allowPrivate: true }],
};

async function time(
  name: string,
  one: () => Promise<Response>,
): Promise<{ name: string; meanUs: number; p50Us: number; p99Us: number }> {
  for (let i = 0; i < Math.min(500, N); i++) await (await one()).text();
  const samples: number[] = [];
  for (let i = 0; i < N; i++) {
    const t = process.hrtime.bigint();
    const res = await one();
    await res.text();
    samples.push(Number(process.hrtime.bigint() - t) / 1000);
  }
  samples.sort((a, b) => a - b);
  const mean = samples.reduce((a, b) => a + b, 0) / samples.length;
  return {
    name,
    meanUs: Math.round(mean),
    p50Us: Math.round(samples[Math.floor(samples.length / 2)]!),
    p99Us: Math.round(samples[Math.floor(samples.length * 0.99)]!),
  };
}

const agent = new Agent();
const plain = EgressGateway.of([vendor]);
let memCount = 0;
const mem = EgressGateway.of([vendor], { audit: { append: async () => ++memCount } });
const auditDb = await PgliteDriver.open(undefined);
await prepareAuditSchema(auditDb, { production: false });
const audited = EgressGateway.of([vendor], { audit: new AuditLog(auditDb) });
const req = { purpose: 'webhook', dataClass: 'full' as const, url };

const results = [];
results.push(await time('fetch', () => fetch(url)));
results.push(
  await time('undici', async () => (await undiciFetch(url, { dispatcher: agent })) as unknown as Response),
);
results.push(await time('gateway', () => plain.fetch(req)));
results.push(await time('gateway+mem', () => mem.fetch(req)));
results.push(await time('gateway+audit', () => audited.fetch(req)));

const base = results[0]!;
const rows = results.map((r) => ({ ...r, ratio: Number((r.meanUs / base.meanUs).toFixed(2)) }));
if (json) console.log(JSON.stringify({ requests: N, node: process.version, rows }, null, 2));
else {
  console.log(`egress bench: ${N} sequential requests each, loopback HTTP, Node ${process.version}`);
  console.log('variant          mean µs   p50 µs   p99 µs   ratio to fetch');
  for (const r of rows)
    console.log(
      `${r.name.padEnd(16)} ${String(r.meanUs).padStart(7)}  ${String(r.p50Us).padStart(7)}  ${String(r.p99Us).padStart(7)}   ${r.ratio.toFixed(2)}`,
    );
  const g = rows.find((r) => r.name === 'gateway')!;
  const u = rows.find((r) => r.name === 'undici')!;
  console.log(`checks alone (gateway − undici, mean): ${g.meanUs - u.meanUs} µs per request`);
}
await plain.close();
await mem.close();
await audited.close();
await agent.close();
await auditDb.close();
server.close();
