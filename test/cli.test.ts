import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { exportJWK, generateKeyPair } from 'jose';
import { verifyInclusion } from '../src/audit/merkle-proof.ts';
import { verifyNote } from '../src/audit/signed-note.ts';
import { createTestStorage, type TestStorage } from './support/storage.ts';
import { freePort } from './support/harness.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const bin = path.join(root, 'bin', 'custos.mjs');

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function custos(args: string[], env: Record<string, string>): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [bin, ...args], { env: { ...process.env, ...env }, cwd: root });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr }));
  });
}

async function token(baseUrl: string, clientId: string, clientSecret: string): Promise<number> {
  const res = await fetch(`${baseUrl}/oauth/token`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({
      grant_type: 'client_credentials',
      scope: 'system/*.cruds',
      client_id: clientId,
      client_secret: clientSecret,
    }),
  });
  await res.arrayBuffer();
  return res.status;
}

describe('custos CLI with storage opened directly', () => {
  let storage: TestStorage;
  let env: Record<string, string>;
  before(async () => {
    storage = await createTestStorage();
    env = { ...storage.env, CUSTOS_PORT: '8080' };
  });
  after(async () => {
    await storage?.cleanup();
  });

  test('init --json prints the INTERFACE.md shape once with a secret, then the same ids without', async () => {
    const first = await custos(['init', '--json'], env);
    assert.equal(first.code, 0, first.stderr);
    const a = JSON.parse(first.stdout) as Record<string, string>;
    assert.deepEqual(Object.keys(a).sort(), [
      'clientId',
      'clientSecret',
      'fhirBaseUrl',
      'projectId',
      'tokenUrl',
    ]);
    assert.equal(a.fhirBaseUrl, 'http://127.0.0.1:8080/fhir/R4');
    assert.equal(a.tokenUrl, 'http://127.0.0.1:8080/oauth/token');
    assert.match(first.stderr, /opening storage directly/);

    const again = await custos(['init', '--json'], env);
    assert.equal(again.code, 0);
    const b = JSON.parse(again.stdout) as Record<string, string>;
    assert.equal(b.projectId, a.projectId);
    assert.equal(b.clientId, a.clientId);
    assert.equal(b.clientSecret, undefined, 'no secret on re-run');

    const rotated = await custos(['init', '--json', '--new-secret'], env);
    const c = JSON.parse(rotated.stdout) as Record<string, string>;
    assert.equal(c.clientId, a.clientId);
    assert.ok(c.clientSecret && c.clientSecret !== a.clientSecret);
  });

  test('client create --json, and usage errors exit 2', async () => {
    const init = JSON.parse((await custos(['init', '--json'], env)).stdout) as Record<string, string>;
    const made = await custos(
      [
        'client',
        'create',
        '--project',
        init.projectId!,
        '--scopes',
        'system/Patient.rs',
        '--purposes',
        'TREAT,HOPERAT',
        '--json',
      ],
      env,
    );
    assert.equal(made.code, 0, made.stderr);
    const c = JSON.parse(made.stdout) as Record<string, string>;
    assert.equal(c.projectId, init.projectId);
    assert.ok(c.clientId && c.clientSecret);

    const missing = await custos(['client', 'create', '--scopes', 'system/*.rs', '--purposes', 'TREAT'], env);
    assert.equal(missing.code, 2);
    const badPurpose = await custos(
      ['client', 'create', '--project', init.projectId!, '--scopes', 'system/*.rs', '--purposes', 'ETREAT'],
      env,
    );
    assert.equal(badPurpose.code, 2);
    assert.match(badPurpose.stderr, /No client may break glass/);
    const noProject = await custos(
      ['client', 'create', '--project', 'no-such-project', '--scopes', 'system/*.rs', '--purposes', 'TREAT'],
      env,
    );
    assert.equal(noProject.code, 2);
  });

  test('client create for SMART apps: --public with --redirect-uri (no secret); usage errors exit 2', async () => {
    const init = JSON.parse((await custos(['init', '--json'], env)).stdout) as Record<string, string>;
    const base = ['client', 'create', '--project', init.projectId!, '--purposes', 'TREAT', '--json'];
    const app = await custos(
      [
        ...base,
        '--scopes',
        'openid fhirUser launch/patient patient/*.rs',
        '--public',
        '--redirect-uri',
        'https://app.example/cb',
      ],
      env,
    );
    assert.equal(app.code, 0, app.stderr);
    const created = JSON.parse(app.stdout) as Record<string, string>;
    assert.ok(created.clientId);
    assert.equal(created.clientSecret, undefined, 'a public app has no secret');
    const noRedirect = await custos([...base, '--scopes', 'patient/*.rs', '--public'], env);
    assert.equal(noRedirect.code, 2);
    assert.match(noRedirect.stderr, /needs --redirect-uri/);
    const both = await custos(
      [
        ...base,
        '--scopes',
        'patient/*.rs',
        '--public',
        '--confidential',
        '--redirect-uri',
        'https://app.example/cb',
      ],
      env,
    );
    assert.equal(both.code, 2);
    const insecure = await custos(
      [...base, '--scopes', 'patient/*.rs', '--public', '--redirect-uri', 'http://app.example/cb'],
      env,
    );
    assert.equal(insecure.code, 2, 'plain http only on a loopback address');
    assert.match(insecure.stderr, /redirect URI must be https/);
  });

  test('client create --jwks registers a SMART Backend Services client: no secret; private keys refused', async () => {
    const init = JSON.parse((await custos(['init', '--json'], env)).stdout) as Record<string, string>;
    const { publicKey, privateKey } = await generateKeyPair('ES384', { extractable: true });
    const dir = fs.mkdtempSync(path.join(storage.dataDir, 'jwks-'));
    const pub = path.join(dir, 'public.jwks.json');
    const priv = path.join(dir, 'private.jwks.json');
    fs.writeFileSync(
      pub,
      JSON.stringify({ keys: [{ ...(await exportJWK(publicKey)), kid: 'k1', alg: 'ES384' }] }),
    );
    fs.writeFileSync(
      priv,
      JSON.stringify({ keys: [{ ...(await exportJWK(privateKey)), kid: 'k1', alg: 'ES384' }] }),
    );
    const made = await custos(
      [
        'client',
        'create',
        '--project',
        init.projectId!,
        '--scopes',
        'system/*.rs',
        '--purposes',
        'TREAT',
        '--jwks',
        pub,
        '--json',
      ],
      env,
    );
    assert.equal(made.code, 0, made.stderr);
    const c = JSON.parse(made.stdout) as Record<string, string>;
    assert.ok(c.clientId);
    assert.equal(c.clientSecret, undefined);
    const refused = await custos(
      [
        'client',
        'create',
        '--project',
        init.projectId!,
        '--scopes',
        'system/*.rs',
        '--purposes',
        'TREAT',
        '--jwks',
        priv,
      ],
      env,
    );
    assert.equal(refused.code, 2);
    assert.ok(
      !refused.stderr.includes(String((await exportJWK(privateKey)).d)),
      'the private key is not echoed',
    );
  });

  test('invalid configuration: exit 2 with one line naming the variable', async () => {
    const r = await custos(['init', '--json'], { ...env, CUSTOS_PORT: 'eighty' });
    assert.equal(r.code, 2);
    assert.equal(r.stdout, '');
    assert.equal(r.stderr.trim().split('\n').length, 1);
    assert.match(r.stderr, /CUSTOS_PORT/);
  });

  test('audit verify --json reports an intact log and exits 0', async () => {
    const r = await custos(['audit', 'verify', '--json'], env);
    assert.equal(r.code, 0, r.stderr);
    const report = JSON.parse(r.stdout) as { ok: boolean; size: number };
    assert.equal(report.ok, true);
    assert.ok(report.size >= 2, 'init and client creation were audited');
  });

  test('audit checkpoint and audit prove print what an outsider can verify', async () => {
    const cp = await custos(['audit', 'checkpoint', '--json'], env);
    assert.equal(cp.code, 0, cp.stderr);
    const c = JSON.parse(cp.stdout) as { note: string; verifierKey: string; treeSize: number };
    assert.ok(verifyNote(c.note, [c.verifierKey]).verifiedBy.length === 1);
    const pr = await custos(['audit', 'prove', '--seq', '0', '--json'], env);
    assert.equal(pr.code, 0, pr.stderr);
    const p = JSON.parse(pr.stdout) as {
      seq: number;
      treeSize: number;
      leafHash: string;
      proof: string[];
      rootHash: string;
    };
    const hex = (x: string) => Buffer.from(x, 'hex');
    assert.equal(
      verifyInclusion(p.seq, p.treeSize, hex(p.leafHash), p.proof.map(hex), hex(p.rootHash)),
      true,
    );
    const missing = await custos(['audit', 'prove', '--seq', '999999'], env);
    assert.equal(missing.code, 1);
    const bad = await custos(['audit', 'prove', '--seq', 'x'], env);
    assert.equal(bad.code, 2);
  });

  test('--help works for every command', async () => {
    for (const args of [
      ['--help'],
      ['serve', '--help'],
      ['init', '--help'],
      ['client', 'create', '--help'],
      ['audit', 'verify', '--help'],
      ['audit', 'checkpoint', '--help'],
      ['audit', 'prove', '--help'],
    ]) {
      const r = await custos(args, env);
      assert.equal(r.code, 0, args.join(' '));
      assert.match(r.stdout, /Usage: custos/);
    }
  });
});

describe('custos CLI while the server runs on the same data', () => {
  let storage: TestStorage;
  let env: Record<string, string>;
  let server: ChildProcess;
  let url: string;
  before(async () => {
    storage = await createTestStorage();
    const port = await freePort();
    env = { ...storage.env, CUSTOS_PORT: String(port) };
    url = `http://127.0.0.1:${port}`;
    server = spawn(process.execPath, [bin, 'serve'], {
      env: { ...process.env, ...env },
      cwd: root,
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    const deadline = Date.now() + 60_000;
    for (;;) {
      try {
        if ((await fetch(`${url}/healthz`)).ok) break;
      } catch {
        /* not up yet */
      }
      if (Date.now() > deadline) throw new Error('server did not start');
      await new Promise((r) => setTimeout(r, 200));
    }
  });
  after(async () => {
    server?.kill('SIGTERM');
    await new Promise((r) => server?.once('exit', r));
    await storage?.cleanup();
  });

  test('commands go through the admin API; the token file is 0600; secrets work at once', async () => {
    const tokenFile = path.join(storage.dataDir, 'admin-token');
    assert.equal(fs.statSync(tokenFile).mode & 0o777, 0o600);
    const first = await custos(['init', '--json'], env);
    assert.equal(first.code, 0, first.stderr);
    assert.match(first.stderr, /admin API/);
    const a = JSON.parse(first.stdout) as Record<string, string>;
    assert.equal(await token(url, a.clientId!, a.clientSecret!), 200);

    const again = JSON.parse((await custos(['init', '--json'], env)).stdout) as Record<string, string>;
    assert.equal(again.clientId, a.clientId);
    assert.equal(again.clientSecret, undefined);

    const rotated = JSON.parse((await custos(['init', '--json', '--new-secret'], env)).stdout) as Record<
      string,
      string
    >;
    assert.equal(
      await token(url, a.clientId!, a.clientSecret!),
      401,
      'the old secret is refused after rotation',
    );
    assert.equal(await token(url, a.clientId!, rotated.clientSecret!), 200);

    const made = await custos(
      [
        'client',
        'create',
        '--project',
        a.projectId!,
        '--scopes',
        'system/*.rs',
        '--purposes',
        'TREAT',
        '--json',
      ],
      env,
    );
    assert.equal(made.code, 0, made.stderr);
    const c = JSON.parse(made.stdout) as Record<string, string>;
    assert.equal(
      await token(url, c.clientId!, c.clientSecret!),
      400,
      'system/*.cruds is not granted to a system/*.rs client',
    );

    const cp = await custos(['audit', 'checkpoint', '--json'], env);
    assert.equal(cp.code, 0, cp.stderr);
    assert.match(cp.stderr, /admin API/);
    const proof = await custos(['audit', 'prove', '--seq', '1', '--json'], env);
    assert.equal(proof.code, 0, proof.stderr);
    assert.equal((JSON.parse(proof.stdout) as { seq: number }).seq, 1);
    const verify = await custos(['audit', 'verify', '--json'], env);
    assert.equal(verify.code, 0);
    assert.equal((JSON.parse(verify.stdout) as { checkpoints: { checked: number } }).checkpoints.checked, 1);
    assert.equal((JSON.parse(verify.stdout) as { ok: boolean }).ok, true);
  });

  test('the admin API refuses a wrong token', async () => {
    const res = await fetch(`${url}/admin/init`, {
      method: 'POST',
      headers: { 'x-custos-admin-token': 'wrong', 'content-type': 'application/json' },
      body: '{}',
    });
    assert.equal(res.status, 401);
  });
});
