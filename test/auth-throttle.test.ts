import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startHarness } from './support/harness.ts';

// Token guessing at the resource server: each bad token is refused (401) and audited; past the
// per-address allowance the address gets 429 before any token of it is checked.

test('bad bearer tokens: 401 and audited, then 429 with Retry-After for that address', async () => {
  const h = await startHarness();
  try {
    const good = await h.token('system/*.rs');
    assert.equal((await h.fhir('/Patient?_count=1', { token: good })).status, 200);
    const statuses: number[] = [];
    for (let i = 0; i < 105; i++) {
      const res = await h.fhir('/Patient?_count=1', { token: `zz-guess-${i}` });
      statuses.push(res.status);
      if (res.status === 429) {
        assert.equal(res.headers.get('retry-after'), '60');
        const body = (await res.json()) as { issue: { code: string }[] };
        assert.equal(body.issue[0]!.code, 'throttled');
      } else await res.arrayBuffer();
    }
    // The allowance: 100 bad tokens (and the few the bucket refills meanwhile, 100 a minute).
    assert.ok(statuses.slice(0, 100).every((s) => s === 401));
    assert.equal(statuses.at(-1), 429);
    assert.ok(statuses.filter((s) => s === 401).length <= 104);
    // While slowed down, the address is refused before its tokens are checked, good ones included.
    assert.equal((await h.fhir('/Patient?_count=1', { token: good })).status, 429);
    const entries = (await h.server.core.audit.read(0, 1_000_000)).map(
      (r) => JSON.parse(r.entry.toString('utf8')) as { outcome: string; code?: string },
    );
    assert.ok(entries.filter((e) => e.outcome === 'refused' && e.code === 'UNAUTHENTICATED').length >= 100);
  } finally {
    await h.close();
  }
});
