import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { decodeProtectedHeader } from 'jose';
import { startHarness } from './support/harness.ts';
import { createTestStorage } from './support/storage.ts';

// Rotating the access-token signing key (`custos keys rotate-token-signing`, admin API): the new key
// signs after a restart, the previous one still verifies the tokens it signed, the one before is
// gone (its tokens refused), and every rotation is audited.

test('token signing key rotation: new key signs, previous verifies, older refused, audited', async () => {
  const storage = await createTestStorage();
  let h = await startHarness({ storage });
  const port = new URL(h.server.url).port;
  const restart = async () => {
    await h.close();
    h = await startHarness({ storage, env: { CUSTOS_PORT: port } });
  };
  const rotate = async () => {
    const token = fs.readFileSync(path.join(h.config.dataDir, 'admin-token'), 'utf8').trim();
    const res = await fetch(`${h.server.url}/admin/keys/token-signing/rotate`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-custos-admin-token': token },
      body: '{}',
    });
    assert.equal(res.status, 200);
    return (await res.json()) as { kid: string; previousKid: string; restartRequired: boolean };
  };
  // `init` gives the client secret only the first time: keep it across restarts.
  const { clientId, clientSecret } = h.init;
  const token = async () => {
    const res = await fetch(`${h.server.url}/oauth/token`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({
        grant_type: 'client_credentials',
        scope: 'system/*.rs',
        client_id: clientId,
        client_secret: clientSecret!,
      }),
    });
    return ((await res.json()) as { access_token: string }).access_token;
  };
  try {
    const t1 = await token();
    const k1 = decodeProtectedHeader(t1).kid!;
    const r1 = await rotate();
    assert.equal(r1.previousKid, k1);
    assert.equal(r1.restartRequired, true);
    await restart();
    const t2 = await token();
    assert.equal(decodeProtectedHeader(t2).kid, r1.kid, 'the new key signs');
    const jwks = (await (await fetch(`${h.server.url}/oauth/jwks`)).json()) as {
      keys: { kid: string; d?: string }[];
    };
    assert.deepEqual(jwks.keys.map((k) => k.kid).sort(), [k1, r1.kid].sort(), 'both published');
    assert.ok(
      jwks.keys.every((k) => k.d === undefined),
      'public keys only',
    );
    const read = (t: string) => h.fhir('/Patient?_count=1', { token: t });
    assert.equal((await read(t1)).status, 200, 'a token of the previous key still verifies');
    assert.equal((await read(t2)).status, 200);

    await rotate();
    await restart();
    assert.equal((await read(t1)).status, 401, 'the key before the previous one is gone');
    assert.equal((await read(t2)).status, 200);
    const entries = (await h.server.core.audit.read(0, 1_000_000)).map(
      (r) => JSON.parse(r.entry.toString('utf8')) as { code: string },
    );
    assert.equal(entries.filter((e) => e.code === 'key.token_signing_rotated').length, 2);
  } finally {
    await h.close();
    await storage.cleanup();
  }
});
