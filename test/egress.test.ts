import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { lookup } from 'node:dns/promises';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import type { AddressInfo } from 'node:net';
import { EgressGateway } from '../src/egress/egress.ts';
import { addressKind, normalizeHost } from '../src/egress/address-policy.ts';
import type { DataClass, Vendor, VendorEndpoint } from '../src/egress/vendor-registry.ts';
import type { AuditEvent } from '../src/audit/audit-event.ts';
import { isCustosError } from '../src/kernel/errors.ts';
import { makePki } from './support/test-pki.ts';

// The egress gateway (issue 7): loopback HTTPS and TLS servers with a throwaway CA; names resolved by
// an injected resolver. Every refusal: the right code, audited, and the server received nothing.

function hasOpenssl(): boolean {
  try {
    execFileSync('openssl', ['version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}
const skip = hasOpenssl() ? false : 'openssl not found: it makes the test certificates';

/** A CA and a server certificate for 127.0.0.1, ::1, localhost and *.example.test. */
function makeCerts(dir: string): { ca: string; cert: string; key: string } {
  const pki = makePki(dir, { serverSan: 'IP:127.0.0.1,IP:::1,DNS:localhost,DNS:*.example.test' });
  const read = (f: string) => fs.readFileSync(f, 'utf8');
  return { ca: read(pki.caFile), cert: read(pki.serverCert), key: read(pki.serverKey) };
}

/** Names the tests resolve themselves; anything else goes to the system resolver. */
const NAMES: Record<string, string[]> = {
  'hooks.example.test': ['127.0.0.1'],
  'expired.example.test': ['127.0.0.1'],
  'nobaa.example.test': ['127.0.0.1'],
  'deid.example.test': ['127.0.0.1'],
  'evil.example.test': ['127.0.0.1'],
  // Registered as ordinary public vendors (no allowPrivate), but resolving to private space.
  'rebind.example.test': ['127.0.0.1'],
  'mixed.example.test': ['93.184.216.34', '10.0.0.5'],
  'metadata.example.test': ['169.254.169.254'],
  'mapped.example.test': ['::ffff:127.0.0.1'],
  'plainpublic.example.test': ['93.184.216.34'],
};
const resolve = async (host: string) =>
  NAMES[host] ?? (await lookup(host, { all: true, verbatim: true })).map((a) => a.address);

function vendor(
  id: string,
  phiClass: DataClass,
  baaState: Vendor['baaState'],
  endpoints: Omit<VendorEndpoint, 'endpointId'>[],
): Vendor {
  return {
    vendorId: id,
    name: id,
    kind: 'vendor',
    services: ['webhooks'],
    phiClass,
    baaState,
    expiresInDays: baaState === 'expired' ? -3 : baaState === 'none' ? undefined : 200,
    endpoints: endpoints.map((e) => ({ ...e, endpointId: `${id}-ep-${e.host}-${e.port}` })),
  };
}

describe('egress gateway', { skip }, () => {
  let dir: string;
  let certs: { ca: string; cert: string; key: string };
  let server: https.Server;
  let plain: http.Server;
  let tlsServer: tls.Server;
  let port: number;
  let plainPort: number;
  let tlsPort: number;
  let unusedPort: number;
  const seen: string[] = [];
  let tlsConnections = 0;
  let audit: AuditEvent[];
  let gateway: EgressGateway;

  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-egress-'));
    certs = makeCerts(dir);
    server = https.createServer({ cert: certs.cert, key: certs.key, minVersion: 'TLSv1.2' }, (req, res) => {
      seen.push(`${req.headers.host ?? ''} ${req.method} ${req.url}`);
      const u = new URL(req.url ?? '/', 'https://x');
      if (u.pathname === '/ok') {
        res.end('ok');
        return;
      }
      if (u.pathname === '/echo') {
        const chunks: Buffer[] = [];
        req.on('data', (c: Buffer) => chunks.push(c));
        req.on('end', () => res.end(Buffer.concat(chunks)));
        return;
      }
      const to = u.searchParams.get('to');
      if (u.pathname === '/redirect' && to) {
        res.writeHead(302, { location: to });
        res.end();
        return;
      }
      if (u.pathname === '/loop') {
        res.writeHead(307, { location: '/loop' });
        res.end();
        return;
      }
      res.writeHead(404).end();
    });
    plain = http.createServer((req, res) => {
      seen.push(`plain ${req.method} ${req.url}`);
      res.end('plain ok');
    });
    tlsServer = tls.createServer({ cert: certs.cert, key: certs.key }, (s) => s.end());
    tlsServer.on('connection', () => tlsConnections++);
    const listen = (s: http.Server | tls.Server) =>
      new Promise<number>((r) => s.listen(0, '127.0.0.1', () => r((s.address() as AddressInfo).port)));
    port = await listen(server);
    plainPort = await listen(plain);
    tlsPort = await listen(tlsServer);
    const spare = http.createServer();
    unusedPort = await listen(spare);
    await new Promise((r) => spare.close(r));
  });

  after(async () => {
    await gateway?.close();
    await new Promise((r) => server.close(r));
    await new Promise((r) => plain.close(r));
    await new Promise((r) => tlsServer.close(r));
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const build = (sink?: (e: AuditEvent) => Promise<number>) => {
    audit = [];
    return EgressGateway.of(
      [
        vendor('hooks', 'full', 'active', [
          { host: 'hooks.example.test', port, protocol: 'https', allowPrivate: true },
          { host: '127.0.0.1', port, protocol: 'https', allowPrivate: true },
        ]),
        vendor('expired', 'full', 'expired', [
          { host: 'expired.example.test', port, protocol: 'https', allowPrivate: true },
        ]),
        vendor('nobaa', 'full', 'none', [
          { host: 'nobaa.example.test', port, protocol: 'https', allowPrivate: true },
        ]),
        vendor('deid', 'deidentified', 'active', [
          { host: 'deid.example.test', port, protocol: 'https', allowPrivate: true },
        ]),
        // Ordinary public registrations: none of these may reach a private address.
        vendor('public', 'full', 'active', [
          { host: 'rebind.example.test', port, protocol: 'https', allowPrivate: false },
          { host: 'mixed.example.test', port, protocol: 'https', allowPrivate: false },
          { host: 'metadata.example.test', port: 443, protocol: 'https', allowPrivate: false },
          { host: 'mapped.example.test', port, protocol: 'https', allowPrivate: false },
          { host: 'localhost', port, protocol: 'https', allowPrivate: false },
          { host: '169.254.169.254', port: 80, protocol: 'https', allowPrivate: false },
          { host: '127.0.0.1', port: unusedPort, protocol: 'https', allowPrivate: false },
        ]),
        vendor('loopback-http', 'none', 'none', [
          { host: '127.0.0.1', port: plainPort, protocol: 'http', allowPrivate: true },
          { host: 'plainpublic.example.test', port: plainPort, protocol: 'http', allowPrivate: true },
        ]),
        vendor('syslog', 'deidentified', 'none', [
          { host: '127.0.0.1', port: tlsPort, protocol: 'tls', allowPrivate: true },
        ]),
      ],
      {
        resolve,
        audit: {
          append:
            sink ??
            (async (e) => {
              audit.push(e);
              return audit.length;
            }),
        },
      },
    );
  };

  before(() => {
    gateway = build();
  });

  /** Expects a refusal with `code`, an audit record of it, and no request at the server. */
  async function refused(code: string, url: string, dataClass: DataClass = 'full', init?: RequestInit) {
    const before = seen.length;
    const auditBefore = audit.length;
    await assert.rejects(
      gateway.fetch({ purpose: 'webhook', dataClass, url, init, ca: certs.ca }),
      (e: unknown) => isCustosError(e) && e.code === code,
    );
    assert.equal(seen.length, before, 'nothing reached the server');
    const last = audit.at(-1)!;
    assert.ok(audit.length > auditBefore, 'the refusal is audited');
    assert.equal(last.action, 'egress');
    assert.equal(last.outcome, 'refused');
    assert.equal(last.code, code);
    assert.equal(last.egress?.dataClass, dataClass);
    return last;
  }

  test('the allowed path: PHI to a vendor with an active BAA, over verified TLS, audited first', async () => {
    const res = await gateway.fetch({
      purpose: 'webhook',
      dataClass: 'full',
      url: `https://hooks.example.test:${port}/echo?patient=pat-1`,
      init: {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: '{"ssn":"900-00-0001"}',
      },
      ca: certs.ca,
    });
    assert.equal(res.status, 200);
    assert.equal(await res.text(), '{"ssn":"900-00-0001"}');
    const e = audit.at(-1)!;
    assert.equal(e.outcome, 'success');
    assert.equal(e.code, 'egress.allowed');
    assert.deepEqual(e.egress, {
      vendorId: 'hooks',
      endpointId: `hooks-ep-hooks.example.test-${port}`,
      host: 'hooks.example.test',
      port,
      dataClass: 'full',
      purpose: 'webhook',
      hop: 0,
    });
    // Host and port only: no path, no query, no body in the audit record.
    const text = JSON.stringify(audit);
    assert.ok(!text.includes('/echo') && !text.includes('patient=') && !text.includes('900-00'));
  });

  test('a webhook URL at 127.0.0.1 (any spelling) that is not registered: refused', async () => {
    const p = unusedPort + 1 === port ? unusedPort + 2 : unusedPort + 1;
    for (const host of ['127.0.0.1', '2130706433', '0x7f.1', '0177.0.0.1', '[::ffff:127.0.0.1]', '[::1]'])
      await refused('EGRESS_DESTINATION_UNREGISTERED', `https://${host}:${p}/hook`);
  });

  test('a registered public endpoint that is a loopback address in another spelling: refused as private', async () => {
    for (const host of ['127.0.0.1', '2130706433', '0x7f.1', '127.1'])
      await refused('EGRESS_PRIVATE_ADDRESS', `https://${host}:${unusedPort}/hook`);
  });

  test('169.254.169.254 (cloud metadata): unregistered, or registered without allowPrivate, refused', async () => {
    await refused('EGRESS_DESTINATION_UNREGISTERED', 'https://169.254.169.254/latest/meta-data/');
    await refused('EGRESS_DESTINATION_UNREGISTERED', 'http://169.254.169.254:8080/latest/meta-data/');
    await refused('EGRESS_PRIVATE_ADDRESS', 'https://169.254.169.254:80/latest/meta-data/');
    await refused('EGRESS_PRIVATE_ADDRESS', 'https://metadata.example.test/latest/meta-data/');
  });

  test('a DNS name that resolves to a private address (any of its records, mapped IPv6, localhost): refused', async () => {
    await refused('EGRESS_PRIVATE_ADDRESS', `https://rebind.example.test:${port}/ok`);
    await refused('EGRESS_PRIVATE_ADDRESS', `https://mixed.example.test:${port}/ok`);
    await refused('EGRESS_PRIVATE_ADDRESS', `https://mapped.example.test:${port}/ok`);
    await refused('EGRESS_PRIVATE_ADDRESS', `https://localhost:${port}/ok`);
  });

  test('DNS rebinding: a name that answers public, then private, is connected to at the checked answer only', async () => {
    // The first answer passes the check; every later one points at the loopback server. The gateway
    // resolves once per request and connects only to what it checked, so the loopback server sees
    // nothing, whatever the public address does (unreachable here: a short connect timeout).
    let calls = 0;
    const flipping = EgressGateway.of(
      [
        vendor('public', 'full', 'active', [
          { host: 'flip.example.test', port, protocol: 'https', allowPrivate: false },
        ]),
      ],
      {
        resolve: async () => (calls++ === 0 ? ['93.184.216.34'] : ['127.0.0.1']),
        connectTimeoutMs: 300,
        audit: { append: async () => 1 },
      },
    );
    try {
      const before = seen.length;
      await assert.rejects(
        flipping.fetch({
          purpose: 'webhook',
          dataClass: 'full',
          url: `https://flip.example.test:${port}/echo`,
          ca: certs.ca,
          init: { signal: AbortSignal.timeout(5_000) },
        }),
      );
      assert.equal(seen.length, before, 'the rebound (private) address was never connected to');
      assert.equal(calls, 1, 'one resolution per request: the connection used the checked answer');
    } finally {
      await flipping.close();
    }
  });

  test('a redirect from a registered vendor to an unregistered host: refused at the hop', async () => {
    const before = seen.length;
    const auditBefore = audit.length;
    await assert.rejects(
      gateway.fetch({
        purpose: 'webhook',
        dataClass: 'full',
        url: `https://hooks.example.test:${port}/redirect?to=${encodeURIComponent(`https://evil.example.test:${port}/ok`)}`,
        ca: certs.ca,
      }),
      (e: unknown) => isCustosError(e) && e.code === 'EGRESS_DESTINATION_UNREGISTERED',
    );
    assert.deepEqual(
      seen.slice(before).map((s) => s.split(' ')[2]!.split('?')[0]),
      ['/redirect'],
      'only the first hop was sent',
    );
    const events = audit.slice(auditBefore);
    assert.deepEqual(
      events.map((e) => [e.egress?.hop, e.outcome, e.code, e.egress?.host]),
      [
        [0, 'success', 'egress.allowed', 'hooks.example.test'],
        [1, 'refused', 'EGRESS_DESTINATION_UNREGISTERED', 'evil.example.test'],
      ],
    );
  });

  test('a redirect to a private address (literal or by DNS): refused at the hop', async () => {
    for (const [to, code] of [
      ['https://169.254.169.254/latest/meta-data/iam/', 'EGRESS_DESTINATION_UNREGISTERED'],
      [`https://rebind.example.test:${port}/ok`, 'EGRESS_PRIVATE_ADDRESS'],
      [`https://127.0.0.1:${unusedPort}/ok`, 'EGRESS_PRIVATE_ADDRESS'],
    ] as const) {
      const before = seen.length;
      await assert.rejects(
        gateway.fetch({
          purpose: 'webhook',
          dataClass: 'full',
          url: `https://hooks.example.test:${port}/redirect?to=${encodeURIComponent(to)}`,
          ca: certs.ca,
        }),
        (e: unknown) => isCustosError(e) && e.code === code,
      );
      assert.equal(seen.length, before + 1, 'only the redirecting hop reached a server');
      assert.equal(audit.at(-1)!.egress?.hop, 1);
    }
  });

  test('redirects within registered endpoints are followed, at most 5', async () => {
    const ok = await gateway.fetch({
      purpose: 'webhook',
      dataClass: 'full',
      url: `https://hooks.example.test:${port}/redirect?to=${encodeURIComponent(`https://127.0.0.1:${port}/ok`)}`,
      ca: certs.ca,
    });
    assert.equal(await ok.text(), 'ok');
    const before = seen.length;
    await assert.rejects(
      gateway.fetch({
        purpose: 'webhook',
        dataClass: 'none',
        url: `https://hooks.example.test:${port}/loop`,
        ca: certs.ca,
      }),
      (e: unknown) => isCustosError(e) && e.code === 'EGRESS_TOO_MANY_REDIRECTS',
    );
    assert.equal(seen.length - before, 6, 'the first request and 5 redirects');
  });

  test('an expired BAA: PHI refused (de-identified data still allowed)', async () => {
    await refused('EGRESS_BAA_EXPIRED', `https://expired.example.test:${port}/ok`, 'full');
    await refused('EGRESS_BAA_EXPIRED', `https://expired.example.test:${port}/ok`, 'limited');
    const res = await gateway.fetch({
      purpose: 'webhook',
      dataClass: 'deidentified',
      url: `https://expired.example.test:${port}/ok`,
      ca: certs.ca,
    });
    assert.equal(res.status, 200);
    await res.text();
  });

  test('no executed BAA: PHI refused', async () => {
    await refused('EGRESS_BAA_INACTIVE', `https://nobaa.example.test:${port}/ok`, 'full');
  });

  test('PHI to a vendor whose BAA covers only de-identified data: refused', async () => {
    await refused('EGRESS_CLASS_NOT_ALLOWED', `https://deid.example.test:${port}/ok`, 'full');
    await refused('EGRESS_CLASS_NOT_ALLOWED', `https://deid.example.test:${port}/ok`, 'limited');
    const res = await gateway.fetch({
      purpose: 'webhook',
      dataClass: 'deidentified',
      url: `https://deid.example.test:${port}/ok`,
      ca: certs.ca,
    });
    assert.equal(await res.text(), 'ok');
  });

  test('TLS: plain http to an https endpoint refused; certificates verified; TLS below 1.2 refused', async () => {
    await refused('EGRESS_INSECURE', `http://hooks.example.test:${port}/ok`);
    await refused('EGRESS_INSECURE', `ftp://hooks.example.test:${port}/ok`);
    // Without the test CA, Node's roots do not know the server's certificate.
    const before = seen.length;
    await assert.rejects(
      gateway.fetch({ purpose: 'webhook', dataClass: 'none', url: `https://hooks.example.test:${port}/ok` }),
      (e: unknown) => {
        const code = (e as { cause?: { code?: string } }).cause?.code ?? '';
        return /CERT|SIGNATURE|ISSUER/.test(code);
      },
    );
    assert.equal(seen.length, before);
    const old = https.createServer(
      { cert: certs.cert, key: certs.key, maxVersion: 'TLSv1.1', minVersion: 'TLSv1' },
      (_q, r) => {
        seen.push('old');
        r.end();
      },
    );
    const oldPort = await new Promise<number>((r) =>
      old.listen(0, '127.0.0.1', () => r((old.address() as AddressInfo).port)),
    );
    try {
      const g = EgressGateway.of([
        vendor('old', 'none', 'none', [
          { host: '127.0.0.1', port: oldPort, protocol: 'https', allowPrivate: true },
        ]),
      ]);
      await assert.rejects(
        g.fetch({
          purpose: 'webhook',
          dataClass: 'none',
          url: `https://127.0.0.1:${oldPort}/`,
          ca: certs.ca,
        }),
      );
      assert.ok(!seen.includes('old'));
      await g.close();
    } finally {
      await new Promise((r) => old.close(r));
    }
  });

  test('plain http only to an http endpoint registered with allowPrivate, over a private address', async () => {
    const res = await gateway.fetch({
      purpose: 'health-check',
      dataClass: 'none',
      url: `http://127.0.0.1:${plainPort}/`,
    });
    assert.equal(await res.text(), 'plain ok');
    await refused('EGRESS_INSECURE', `http://plainpublic.example.test:${plainPort}/`, 'none');
  });

  test('if the audit log cannot take the record, nothing is sent', async () => {
    const g = build(async () => {
      throw new Error('audit down');
    });
    const before = seen.length;
    await assert.rejects(
      g.fetch({
        purpose: 'webhook',
        dataClass: 'full',
        url: `https://hooks.example.test:${port}/ok`,
        ca: certs.ca,
      }),
      (e: unknown) => isCustosError(e) && e.code === 'AUDIT_UNAVAILABLE',
    );
    assert.equal(seen.length, before);
    await g.close();
    gateway = build();
  });

  test('egressConnectTls: a registered tls endpoint connects; others are refused before any connection', async () => {
    const s = await gateway.connectTls({
      purpose: 'audit-siem',
      dataClass: 'deidentified',
      host: '127.0.0.1',
      port: tlsPort,
      ca: certs.ca,
    });
    assert.equal(s.authorized, true);
    s.destroy();
    const connections = tlsConnections;
    for (const [host, p, code, cls] of [
      ['127.0.0.1', tlsPort, 'EGRESS_CLASS_NOT_ALLOWED', 'full'],
      ['127.0.0.2', tlsPort, 'EGRESS_DESTINATION_UNREGISTERED', 'none'],
      ['hooks.example.test', port, 'EGRESS_DESTINATION_UNREGISTERED', 'none'], // an https endpoint, not tls
      ['2130706433', unusedPort, 'EGRESS_DESTINATION_UNREGISTERED', 'none'],
    ] as const) {
      await assert.rejects(
        gateway.connectTls({ purpose: 'audit-siem', dataClass: cls, host, port: p, ca: certs.ca }),
        (e: unknown) => isCustosError(e) && e.code === code,
      );
      assert.equal(audit.at(-1)!.code, code);
    }
    assert.equal(tlsConnections, connections, 'no connection was opened');
  });

  test('address classification and host normalization', () => {
    for (const a of ['127.0.0.1', '::1', '::ffff:127.0.0.1', '::ffff:7f00:1', '2002:7f00:1::'])
      assert.equal(addressKind(a), 'loopback', a);
    for (const a of ['169.254.169.254', 'fe80::1', '::ffff:169.254.169.254'])
      assert.equal(addressKind(a), 'link-local', a);
    for (const a of ['10.0.0.1', '172.16.5.4', '192.168.1.1', '100.64.0.1', 'fd12::1', '64:ff9b::a00:1'])
      assert.equal(addressKind(a), 'private', a);
    for (const a of ['0.0.0.0', '::', '192.0.2.1', '2001:db8::1', '224.0.0.1', '255.255.255.255', 'ff02::1'])
      assert.equal(addressKind(a), 'reserved', a);
    for (const a of ['93.184.216.34', '2606:4700::1111', '::ffff:93.184.216.34'])
      assert.equal(addressKind(a), 'public', a);
    assert.equal(normalizeHost('2130706433'), '127.0.0.1');
    assert.equal(normalizeHost('0x7f.1'), '127.0.0.1');
    assert.equal(normalizeHost('[::ffff:127.0.0.1]'), '::ffff:7f00:1');
    assert.equal(normalizeHost('Hooks.Example.TEST.'), 'hooks.example.test');
    assert.equal(normalizeHost('a b'), undefined);
  });
});
