import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import https from 'node:https';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { startHarness, freePort } from './support/harness.ts';

function selfSignedCert(): { cert: string; key: string; dir: string } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-tls-'));
  const cert = path.join(dir, 'cert.pem');
  const key = path.join(dir, 'key.pem');
  execFileSync(
    'openssl',
    [
      'req',
      '-x509',
      '-newkey',
      'ec',
      '-pkeyopt',
      'ec_paramgen_curve:P-256',
      '-nodes',
      '-keyout',
      key,
      '-out',
      cert,
      '-days',
      '1',
      '-subj',
      '/CN=127.0.0.1',
      '-addext',
      'subjectAltName=IP:127.0.0.1',
    ],
    { stdio: 'ignore' },
  );
  return { cert, key, dir };
}

function get(url: string, ca: string): Promise<number> {
  return new Promise((resolve, reject) => {
    https
      .get(url, { ca }, (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      })
      .on('error', reject);
  });
}

test('with CUSTOS_TLS_CERT/KEY the listener speaks TLS 1.2+ only', async () => {
  const { cert, key, dir } = selfSignedCert();
  const port = await freePort();
  const h = await startHarness({
    env: {
      CUSTOS_TLS_CERT: cert,
      CUSTOS_TLS_KEY: key,
      CUSTOS_PORT: String(port),
      CUSTOS_PUBLIC_URL: `https://127.0.0.1:${port}`,
    },
  });
  try {
    assert.match(h.server.url, /^https:/);
    assert.equal(await get(`https://127.0.0.1:${port}/fhir/R4/metadata`, fs.readFileSync(cert, 'utf8')), 200);
    // A TLS 1.1 client must be refused.
    await assert.rejects(
      new Promise((resolve, reject) => {
        const s = tls.connect(
          {
            host: '127.0.0.1',
            port,
            maxVersion: 'TLSv1.1',
            minVersion: 'TLSv1',
            ca: fs.readFileSync(cert, 'utf8'),
          },
          () => resolve(s),
        );
        s.on('error', reject);
      }),
    );
  } finally {
    await h.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

async function auditedIp(trusted: boolean): Promise<string | undefined> {
  const h = await startHarness({ env: trusted ? { CUSTOS_TRUSTED_PROXIES: '127.0.0.1' } : {} });
  try {
    const res = await h.fhir('/Patient/nope', { headers: { 'x-forwarded-for': '203.0.113.7' } });
    const rows = await h.server.core.audit.read(0, 10000);
    const e = rows
      .map((r) => JSON.parse(r.entry.toString('utf8')))
      .find((x) => x.requestId === res.headers.get('x-request-id'));
    return e?.source?.ip;
  } finally {
    await h.close();
  }
}

test('X-Forwarded-For is believed only from a trusted proxy', async () => {
  assert.equal(await auditedIp(false), '127.0.0.1');
  assert.equal(await auditedIp(true), '203.0.113.7');
});
