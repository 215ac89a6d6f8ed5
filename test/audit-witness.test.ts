import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, generateKeyPairSync } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startHarness, testPatient, type Harness } from './support/harness.ts';
import {
  consistencyVerifies,
  cosign,
  cosignatureVerifies,
  cosignerVkey,
  startWitnessStub,
  type WitnessStub,
} from './support/witness-stub.ts';
import { runCustos } from './support/custos-cli.ts';
import { ConfigError, loadConfig } from '../src/config/config.ts';
import { isCustosError } from '../src/kernel/errors.ts';
import { verifyAuditLog } from '../src/audit/audit-verify.ts';
import { parseCheckpoint, parseVerifierKey, verifyNote } from '../src/audit/signed-note.ts';
import {
  cosignatureKeyId,
  cosignedFileName,
  parseCosignature,
  parseSignatureLine,
  parseWitnessKey,
  verifyCosignature,
  witnessRequest,
  type WitnessResult,
} from '../src/audit/witness.ts';

// Checkpoint witnesses (C2SP tlog-witness / tlog-cosignature) against a local witness STUB
// (test/support/witness-stub.ts: no public witness is reachable from here). What an auditor cares
// about: the witness cosigns only a log that grew append-only from what it cosigned before; every
// cosignature Custos keeps verifies against the witness's key; a forged one is refused and makes
// verify fail; a rewritten or truncated log is refused by the witness and that refusal is surfaced;
// and none of it ever stands between a client and its FHIR data.

const sha256 = (...parts: Buffer[]) => {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest();
};

/** RFC 9162 §2.1.1 MTH over leaf hashes, recursively: independent of src/audit. */
function mth(leaves: Buffer[]): Buffer {
  if (leaves.length === 0) return sha256();
  if (leaves.length === 1) return leaves[0]!;
  let k = 1;
  while (k * 2 < leaves.length) k *= 2;
  return sha256(Buffer.from([1]), mth(leaves.slice(0, k)), mth(leaves.slice(k)));
}

async function until(what: string, fn: () => Promise<boolean> | boolean, ms = 15_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await fn())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function grow(h: Harness, n = 1): Promise<void> {
  for (let i = 0; i < n; i++) {
    const r = await h.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) });
    assert.equal(r.status, 201);
  }
}

function originOf(h: Harness): string {
  return parseVerifierKey(h.server.core.checkpoints.verifierKey()).name;
}

/** The audit events Custos appended about witnesses (action admin, code witness.*). */
async function witnessEvents(h: Harness): Promise<{ code: string; outcome: string; count?: number }[]> {
  const rows = await h.server.core.audit.read(0, 100_000);
  return rows
    .map((r) => JSON.parse(r.entry.toString('utf8')) as { code?: string; outcome: string; count?: number })
    .filter((e): e is { code: string; outcome: string; count?: number } => !!e.code?.startsWith('witness.'));
}

function logged(h: Harness, event: string, code?: string): boolean {
  return h.logLines.some((l) => {
    const j = JSON.parse(l) as { msg?: string; event?: string; code?: string };
    return (j.msg === event || j.event === event) && (code === undefined || j.code === code);
  });
}

/** Runs statements as the audit tables' owner would: with their triggers off, in one transaction. */
async function asOwner(h: Harness, statements: [string, unknown[]?][]): Promise<void> {
  const tables = ['audit_entry', 'audit_index', 'audit_checkpoint', 'audit_cosignature'];
  await h.server.core.auditDb.transaction(async (tx) => {
    for (const t of tables) await tx.query(`ALTER TABLE ${t} DISABLE TRIGGER USER`);
    for (const [sql, params] of statements) await tx.query(sql, params ?? []);
    for (const t of tables) await tx.query(`ALTER TABLE ${t} ENABLE TRIGGER USER`);
  });
}

function tmpDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'custos-witness-'));
}

describe('scheduled checkpoints are cosigned by a witness', () => {
  let stub: WitnessStub;
  let h: Harness;
  let dir: string;
  before(async () => {
    stub = await startWitnessStub();
    dir = tmpDir();
    h = await startHarness({
      env: {
        CUSTOS_AUDIT_CHECKPOINT_INTERVAL: '1',
        CUSTOS_AUDIT_CHECKPOINT_DIR: dir,
        CUSTOS_AUDIT_WITNESSES: `${stub.vkey}=${stub.url}`,
      },
    });
    stub.trust(h.server.core.checkpoints.verifierKey());
  });
  after(async () => {
    await h?.close();
    await stub?.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('the first checkpoint goes out with old 0 and no proof; the cosignature verifies and is kept', async () => {
    await grow(h);
    const origin = originOf(h);
    await until('a cosigned checkpoint', async () => {
      const r = await h.server.core.auditDb.query('SELECT 1 FROM audit_cosignature');
      return r.rows.length > 0;
    });
    const first = stub.requests.find((r) => r.status === 200)!;
    assert.equal(first.old, 0);
    assert.equal(first.proofLines, 0);
    assert.match(first.body, /^old 0\n\n/);
    // Through the egress port, under its own purpose.
    assert.ok(h.logLines.some((l) => l.includes('"egress.request"') && l.includes('"audit-witness"')));

    const rows = await h.server.core.auditDb.query<{
      tree_size: string | number;
      witness: string;
      signature: string;
      note: string;
    }>('SELECT tree_size, witness, signature, note FROM audit_cosignature ORDER BY tree_size');
    const row = rows.rows[0]!;
    assert.equal(row.witness, stub.vkey);
    // The cosigned note: our checkpoint, our signature, then the witness's, checked here with the
    // stub's independent code and the witness's raw public key.
    const text = verifyNote(row.note, [h.server.core.checkpoints.verifierKey()]).text;
    assert.equal(parseCheckpoint(text).size, Number(row.tree_size));
    assert.equal(parseCheckpoint(text).origin, origin);
    assert.ok(row.note.endsWith(`${row.signature}\n`));
    const pub = parseWitnessKey(stub.vkey).publicKeyRaw;
    assert.ok(cosignatureVerifies(row.signature, stub.name, pub, text));
    assert.ok(!cosignatureVerifies(row.signature, stub.name, pub, text.replace(/\n\d+\n/, '\n999\n')));

    // And in the export directory, beside the checkpoint itself.
    const file = path.join(dir, cosignedFileName(Number(row.tree_size)));
    await until('the cosigned note file', () => fs.existsSync(file));
    const exported = fs.readFileSync(file, 'utf8');
    assert.ok(exported.startsWith(row.note.slice(0, row.note.indexOf('\n\n') + 2)));
    assert.ok(exported.includes(`${row.signature}\n`));
  });

  test('as the log grows the witness follows with consistency proofs from what it cosigned', async () => {
    const before = stub.state(originOf(h))!.size;
    await grow(h, 3);
    const size = await h.server.core.audit.size();
    await until('the witness at the new size', () => (stub.state(originOf(h))?.size ?? 0) >= size);
    const next = stub.requests.find((r) => r.status === 200 && r.old === before)!;
    assert.ok(next, 'a request from the size the witness had');
    assert.ok(next.proofLines > 0, 'with a consistency proof');
    // The witness answers before the server stores its cosignature: wait for the stored one.
    await until(
      'the stored cosignature at the new size',
      async () => ((await h.server.core.witnesses.status())[0]?.cosignedSize ?? 0) >= size,
    );
    const status = await h.server.core.witnesses.status();
    assert.equal(status.length, 1);
    assert.equal(status[0]!.name, stub.name);
    assert.ok(status[0]!.cosignedSize >= size);
  });

  test('verify checks every stored cosignature and says how many checkpoints are witnessed, by whom', async () => {
    const r = await verifyAuditLog(h.server.core.audit, h.server.core.checkpoints, {
      witnesses: h.server.core.witnesses,
    });
    assert.equal(r.ok, true);
    const w = r.witnesses!;
    assert.equal(w.firstBad, undefined);
    assert.ok(w.witnessed >= 2 && w.witnessed <= w.checkpoints);
    assert.ok(w.cosignatures >= 2);
    assert.equal(w.byWitness[0]!.name, stub.name);
    assert.equal(w.byWitness[0]!.checkpoints, w.witnessed);
    // The admin API (what the CLI uses while the server runs) reports the same.
    const token = fs.readFileSync(path.join(h.config.dataDir, 'admin-token'), 'utf8').trim();
    const res = await fetch(`${h.server.url}/admin/audit/verify`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-custos-admin-token': token },
      body: '{}',
    });
    const viaApi = (await res.json()) as { ok: boolean; witnesses?: { witnessed: number } };
    assert.equal(viaApi.ok, true);
    assert.ok((viaApi.witnesses?.witnessed ?? 0) >= 2);
  });

  test('a witness that hangs, then is gone, never holds up a FHIR request', async () => {
    stub.misbehave = 'hang';
    const seen = stub.requests.length;
    await grow(h);
    await until('a request to the hanging witness', () => stub.requests.length > seen);
    for (let i = 0; i < 3; i++) {
      const t0 = performance.now();
      const c = await h.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) });
      assert.equal(c.status, 201);
      const id = ((await c.json()) as { id: string }).id;
      const r = await h.fhir(`/Patient/${id}`);
      assert.equal(r.status, 200);
      assert.ok(performance.now() - t0 < 3000, 'not waiting on the witness');
    }
    await stub.close(); // the witness goes away mid-request
    await until(
      'the witness reported unreachable',
      async () => (await h.server.core.witnesses.status())[0]!.problem === 'unreachable',
    );
    const c = await h.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) });
    assert.equal(c.status, 201);
    const s = (await h.server.core.witnesses.status())[0]!;
    assert.ok(s.lag > 0, 'the lag is reported');
    assert.ok(logged(h, 'audit.witness_failed', 'unreachable'));
    // An outage is operational, not evidence: logged, not appended to the audit log.
    assert.ok(!(await witnessEvents(h)).some((e) => e.code === 'witness.unreachable'));
  });
});

describe('witness protocol paths, forged cosignatures and a rewritten log', () => {
  let stub: WitnessStub;
  let h: Harness;
  let dir: string;
  let origin: string;
  const submit = async (): Promise<WitnessResult> => {
    await h.server.core.checkpoints.checkpoint();
    const [r] = await h.server.core.witnesses.submit();
    return r!;
  };
  const verify = () =>
    verifyAuditLog(h.server.core.audit, h.server.core.checkpoints, { witnesses: h.server.core.witnesses });

  before(async () => {
    stub = await startWitnessStub({ name: 'witness.test/manual' });
    dir = tmpDir();
    h = await startHarness({
      env: {
        CUSTOS_AUDIT_CHECKPOINT_INTERVAL: '0',
        CUSTOS_AUDIT_CHECKPOINT_DIR: dir,
        CUSTOS_AUDIT_WITNESSES: `${stub.vkey}=${stub.url}/`,
      },
    });
    stub.trust(h.server.core.checkpoints.verifierKey());
    origin = originOf(h);
  });
  after(async () => {
    await h?.close();
    await stub?.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('the add-checkpoint body is exactly old, proof lines, a blank line, the checkpoint note', async () => {
    await grow(h, 3);
    const cp = await h.server.core.checkpoints.checkpoint();
    const leaves = await h.server.core.audit.leafHashes(0, cp.treeSize);
    for (const old of [0, 1, 2, 5, cp.treeSize - 1, cp.treeSize]) {
      const r = await witnessRequest(h.server.core.checkpoints, old);
      assert.equal(r.treeSize, cp.treeSize);
      assert.equal(r.checkpoint, cp.note);
      // Parse it back as a witness would.
      const lines = r.body.split('\n');
      assert.equal(lines[0], `old ${old}`);
      const proof: Buffer[] = [];
      let i = 1;
      for (; lines[i] !== ''; i++) {
        assert.match(lines[i]!, /^[A-Za-z0-9+/]{43}=$/);
        proof.push(Buffer.from(lines[i]!, 'base64'));
      }
      assert.equal(r.body, `old ${old}\n${r.proof.map((p) => `${p}\n`).join('')}\n${cp.note}`);
      assert.equal(lines.slice(i + 1).join('\n'), cp.note);
      assert.deepEqual(
        proof.map((p) => p.toString('base64')),
        r.proof,
      );
      if (old === 0 || old === cp.treeSize) assert.equal(proof.length, 0, 'no proof lines');
      else {
        assert.ok(proof.length > 0 && proof.length <= 63);
        assert.ok(consistencyVerifies(old, cp.treeSize, proof, mth(leaves.slice(0, old)), mth(leaves)));
      }
    }
    // Bad input: a clear 400-class error naming the problem, never a crash.
    for (const bad of [-1, 1.5, '3', null, cp.treeSize + 1000]) {
      await assert.rejects(witnessRequest(h.server.core.checkpoints, bad), (e: unknown) => {
        assert.ok(isCustosError(e) && e.status === 400);
        return true;
      });
    }
    // The admin API: JSON, and the exact body as text/plain.
    const token = fs.readFileSync(path.join(h.config.dataDir, 'admin-token'), 'utf8').trim();
    const headers = { 'x-custos-admin-token': token };
    const plain = await fetch(`${h.server.url}/admin/audit/witness-request?old=2`, { headers });
    assert.equal(plain.status, 200);
    assert.match(plain.headers.get('content-type') ?? '', /^text\/plain/);
    assert.equal(await plain.text(), (await witnessRequest(h.server.core.checkpoints, 2)).body);
    const badGet = await fetch(`${h.server.url}/admin/audit/witness-request?old=two`, { headers });
    assert.equal(badGet.status, 400);
    const noToken = await fetch(`${h.server.url}/admin/audit/witness-request?old=2`);
    assert.ok(noToken.status === 401 || noToken.status === 403);
  });

  test('custos audit witness-request prints the body byte for byte; bad sizes exit 2', async () => {
    const env = h.storage.env;
    const ok = await runCustos(['audit', 'witness-request', '--old', '1'], env);
    assert.equal(ok.code, 0, ok.stderr);
    assert.equal(ok.stdout, (await witnessRequest(h.server.core.checkpoints, 1)).body);
    const bad = await runCustos(['audit', 'witness-request', '--old', 'x'], env);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /--old must be a non-negative integer/);
    const big = await runCustos(['audit', 'witness-request', '--old', '99999999'], env);
    assert.equal(big.code, 2);
    assert.match(big.stderr, /larger than the newest signed checkpoint/);
  });

  test('the witness cosigns; a 409 from a witness restarted with another size is followed', async () => {
    const r0 = await submit();
    assert.equal(r0.ok, true, r0.problem);
    await grow(h, 2);
    const r1 = await submit();
    assert.equal(r1.ok, true, r1.problem);
    const s0 = r0.treeSize;
    const s1 = r1.treeSize;
    assert.equal(stub.state(origin)!.size, s1);
    // The witness comes back from a backup that knows only s0.
    const key = stub.privateKey;
    await stub.close();
    const root0 = parseCheckpoint(
      verifyNote((await h.server.core.checkpoints.consistency(s0, s1)).from.checkpoint!, [
        h.server.core.checkpoints.verifierKey(),
      ]).text,
    ).rootHash;
    stub = await startWitnessStub({
      name: 'witness.test/manual',
      port: stub.port,
      privateKey: key,
      trusted: [h.server.core.checkpoints.verifierKey()],
      state: { [origin]: { size: s0, root: root0 } },
    });
    await grow(h);
    const r2 = await submit();
    assert.equal(r2.ok, true, r2.problem);
    assert.equal(r2.attempts, 2);
    assert.deepEqual(
      stub.requests.map((q) => [q.old, q.status]),
      [
        [s1, 409],
        [s0, 200],
      ],
    );
    assert.equal(stub.state(origin)!.size, r2.treeSize);
    assert.ok(logged(h, 'audit.witness_size'));
  });

  test('a witness answering 409 with ever-changing sizes is given up after 3 requests', async () => {
    stub.misbehave = 'flapping-409';
    const n = stub.requests.length;
    await grow(h);
    const r = await submit();
    stub.misbehave = undefined;
    assert.equal(r.ok, false);
    assert.equal(r.problem, 'conflict');
    assert.equal(r.attempts, 3);
    assert.equal(stub.requests.length - n, 3);
    assert.ok((await witnessEvents(h)).some((e) => e.code === 'witness.conflict' && e.outcome === 'failed'));
  });

  test('a forged cosignature (another key, or another checkpoint) is refused, logged and audited', async () => {
    const count = async () =>
      Number(
        (await h.server.core.auditDb.query<{ n: number }>('SELECT count(*) AS n FROM audit_cosignature'))
          .rows[0]!.n,
      );
    for (const [mode, problem] of [
      ['wrong-key', 'bad_cosignature'],
      ['altered', 'bad_cosignature'],
      ['foreign-only', 'no_cosignature'],
    ] as const) {
      stub.misbehave = mode;
      const before = await count();
      await grow(h);
      const r = await submit();
      assert.equal(r.ok, false, mode);
      assert.equal(r.problem, problem, mode);
      assert.equal(r.status, 200);
      assert.equal(await count(), before, 'nothing stored');
      assert.ok(!fs.existsSync(path.join(dir, cosignedFileName(r.treeSize))), 'nothing exported');
    }
    stub.misbehave = undefined;
    assert.ok(logged(h, 'audit.witness_refused', 'bad_cosignature'));
    const codes = (await witnessEvents(h)).map((e) => e.code);
    assert.ok(codes.includes('witness.bad_cosignature'));
    assert.ok(codes.includes('witness.no_cosignature'));
    // Honest again: it recovers (after a 409 to the size it reached while lying).
    await grow(h);
    const ok = await submit();
    assert.equal(ok.ok, true, ok.problem);
    assert.equal((await verify()).ok, true);
  });

  test('verify fails on a forged cosignature in the table or the export directory', async () => {
    const good = await verify();
    assert.equal(good.ok, true);
    const cps = await h.server.core.checkpoints.list();
    const cp = cps.find((c) => !c.external)!;
    const text = cp.note.slice(0, cp.note.indexOf('\n\n') + 1);
    const forger = generateKeyPairSync('ed25519').privateKey;
    const now = Math.floor(Date.now() / 1000);
    const wkey = parseWitnessKey(stub.vkey);

    // 1. Someone able to INSERT adds a cosignature under the witness's name and key ID.
    const forged = cosign(stub.name, forger, text, now, wkey.keyId);
    await h.server.core.auditDb.query(
      'INSERT INTO audit_cosignature (tree_size, witness, signature, cosigned_at, note) VALUES ($1, $2, $3, $4, $5)',
      [cp.treeSize, stub.vkey, forged, now, `${cp.note}${forged}\n`],
    );
    let r = await verify();
    assert.equal(r.ok, false);
    assert.deepEqual(r.witnesses!.firstBad, {
      treeSize: cp.treeSize,
      witness: stub.name,
      problem: 'invalid_cosignature',
      external: false,
    });
    await asOwner(h, [['DELETE FROM audit_cosignature WHERE signature = $1', [forged]]]);

    // 2. A genuine cosignature by the witness's key, but of a checkpoint this log never signed.
    const fork = `${origin}\n${cp.treeSize}\n${Buffer.alloc(32, 9).toString('base64')}\n`;
    const ourLine = cp.note.slice(cp.note.indexOf('\n\n') + 2);
    const forkCosig = cosign(stub.name, stub.privateKey, fork, now);
    await h.server.core.auditDb.query(
      'INSERT INTO audit_cosignature (tree_size, witness, signature, cosigned_at, note) VALUES ($1, $2, $3, $4, $5)',
      [cp.treeSize, stub.vkey, forkCosig, now, `${fork}\n${ourLine}${forkCosig}\n`],
    );
    r = await verify();
    assert.equal(r.ok, false);
    assert.equal(r.witnesses!.firstBad?.problem, 'no_checkpoint');
    await asOwner(h, [['DELETE FROM audit_cosignature WHERE signature = $1', [forkCosig]]]);
    assert.equal((await verify()).ok, true);

    // 3. An exported cosigned note whose cosignature was altered.
    const file = fs
      .readdirSync(dir)
      .filter((f) => f.endsWith('.cosigned.note'))
      .sort()[0]!;
    const full = path.join(dir, file);
    const original = fs.readFileSync(full, 'utf8');
    const lines = original.trimEnd().split('\n');
    const last = parseSignatureLine(lines[lines.length - 1]!)!;
    const raw = Buffer.from(last.raw);
    raw[raw.length - 1]! ^= 1;
    lines[lines.length - 1] = `\u2014 ${last.name} ${raw.toString('base64')}`;
    fs.writeFileSync(full, `${lines.join('\n')}\n`);
    r = await verify();
    assert.equal(r.ok, false);
    assert.equal(r.witnesses!.firstBad?.problem, 'invalid_cosignature');
    assert.equal(r.witnesses!.firstBad?.external, true);
    fs.writeFileSync(full, original);
    assert.equal((await verify()).ok, true);
  });

  test('a log rewritten after it was cosigned is refused by the witness (422), and that is surfaced', async () => {
    await grow(h);
    const cosigned = await submit();
    assert.equal(cosigned.ok, true, cosigned.problem);
    const witnessSize = stub.state(origin)!.size;
    // The owner rewrites history: keeps the first `keep` entries, drops the rest (and the
    // checkpoints over them), then the log grows past what the witness saw.
    const keep = witnessSize - 4;
    await asOwner(h, [
      ['DELETE FROM audit_entry WHERE seq >= $1', [keep]],
      ['DELETE FROM audit_index WHERE seq >= $1', [keep]],
      ['DELETE FROM audit_checkpoint WHERE tree_size > $1', [keep]],
    ]);
    while ((await h.server.core.audit.size()) <= witnessSize + 1) await grow(h);
    const r = await submit();
    assert.equal(r.ok, false);
    assert.equal(r.problem, 'inconsistent');
    assert.equal(r.status, 422);
    assert.equal(stub.requests.at(-1)!.old, witnessSize, 'sent from what the witness had cosigned');
    assert.equal(stub.state(origin)!.size, witnessSize, 'the witness did not move');
    assert.ok(logged(h, 'audit.witness_refused', 'inconsistent'));
    assert.ok((await witnessEvents(h)).some((e) => e.code === 'witness.inconsistent'));
    assert.equal((await h.server.core.witnesses.status())[0]!.problem, 'inconsistent');
  });

  test('a truncated log is caught by the witness (409 with a larger size) even with our records gone', async () => {
    const witnessSize = stub.state(origin)!.size;
    const keep = witnessSize - 6;
    // A thorough attacker also removes the cosignatures, so this log no longer knows what the
    // witness saw: it asks from 0, and the witness answers with its size, which the log lacks.
    await asOwner(h, [
      ['DELETE FROM audit_entry WHERE seq >= $1', [keep]],
      ['DELETE FROM audit_index WHERE seq >= $1', [keep]],
      ['DELETE FROM audit_checkpoint WHERE tree_size > $1', [keep]],
      ['DELETE FROM audit_cosignature', []],
    ]);
    const r = await submit();
    assert.equal(r.treeSize, keep);
    assert.equal(r.ok, false);
    assert.equal(r.problem, 'witness_ahead');
    assert.equal(r.status, 409);
    assert.deepEqual(
      stub.requests.slice(-1).map((q) => [q.old, q.status]),
      [[0, 409]],
    );
    assert.ok(logged(h, 'audit.witness_refused', 'witness_ahead'));
    assert.ok((await witnessEvents(h)).some((e) => e.code === 'witness.witness_ahead'));
    // verify fails too: the exported checkpoints are larger than the log.
    assert.equal((await verify()).ok, false);
    // And the operator sees it: `custos audit witnesses` (through the running server) exits 1.
    const cli = await runCustos(['audit', 'witnesses', '--json'], h.storage.env);
    assert.equal(cli.code, 1, cli.stderr);
    const status = JSON.parse(cli.stdout) as { name: string; problem?: string; lag: number }[];
    assert.equal(status[0]!.name, stub.name);
    assert.equal(status[0]!.problem, 'witness_ahead');
  });
});

describe('witness keys, cosignature encoding and configuration', () => {
  test('a cosignature/v1 key ID is SHA-256(name || 0x0A || 0x04 || key)[:4]; published keys parse', () => {
    // A native cosignature/v1 vkey from transparency-dev/formats note/note_cosigv1_test.go.
    const remora = parseWitnessKey('remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2');
    assert.equal(remora.name, 'remora.n621.de');
    assert.equal(remora.keyId.toString('hex'), 'da77ade7');
    assert.deepEqual(
      cosignatureKeyId(remora.name, remora.publicKeyRaw),
      sha256(Buffer.from('remora.n621.de\n\x04', 'latin1'), remora.publicKeyRaw).subarray(0, 4),
    );
    // A log's note key (type 0x01) is not a witness key; a wrong key ID is refused.
    assert.throws(
      () => parseWitnessKey('TEST+7997405c+AQcC+FTVKf0jlTdHDY3rbevmnKxxPjigCXlVtGe6RIr6'),
      /0x01/,
    );
    assert.throws(() =>
      parseWitnessKey('remora.n621.de+00000000+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2'),
    );
    assert.throws(() => parseWitnessKey('no-plus-signs'));
  });

  test('the timestamped signature is key ID, 8-byte big-endian seconds, 64-byte signature', () => {
    // transparency-dev/formats TestCosignatureTimestamp: this signature carries time 1727964367.
    const raw = Buffer.from(
      'ZGhGuQAAAABm/qTPeyKXD+R2rzyQsxPiP8mXum7qq/iF0u4vanlqJyocWODBt97w9uL+8qT7S5gxEHWWOworDcFiEBYJXORmnFBOBA==',
      'base64',
    );
    assert.equal(parseCosignature(raw)?.timestamp, 1727964367);
    // A plain note signature (4 + 64 bytes) is not a cosignature.
    assert.equal(parseCosignature(raw.subarray(0, 68)), undefined);
  });

  test('signing and verifying agree with the independent stub code, and tampering is caught', () => {
    const { privateKey } = generateKeyPairSync('ed25519');
    const vkey = cosignerVkey('w.example/x', privateKey);
    const key = parseWitnessKey(vkey);
    const text = 'log.example/a\n7\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n';
    const line = cosign('w.example/x', privateKey, text, 1700000000);
    assert.equal(verifyCosignature(text, line, key), 1700000000);
    assert.throws(() => verifyCosignature(text.replace('7', '8'), line, key), /does not verify/);
    const other = cosign(
      'w.example/x',
      generateKeyPairSync('ed25519').privateKey,
      text,
      1700000000,
      key.keyId,
    );
    assert.throws(() => verifyCosignature(text, other, key), /does not verify/);
    assert.throws(
      () => verifyCosignature(text, line.replace('w.example/x', 'w.example/y'), key),
      /not signed by/,
    );
  });

  test('CUSTOS_AUDIT_WITNESSES: bad values stop the start with one line naming the variable', () => {
    const { privateKey } = generateKeyPairSync('ed25519');
    const vkey = cosignerVkey('w.example/x', privateKey);
    const ok = loadConfig({ CUSTOS_AUDIT_WITNESSES: ` ${vkey}=https://w.example/x/ , ` }, '/tmp');
    assert.deepEqual(ok.auditWitnesses, [{ vkey, url: 'https://w.example/x' }]);
    assert.deepEqual(loadConfig({}, '/tmp').auditWitnesses, []);
    const logKey = 'TEST+7997405c+AQcC+FTVKf0jlTdHDY3rbevmnKxxPjigCXlVtGe6RIr6';
    for (const [value, why] of [
      ['garbage', /<vkey>=<url>/],
      [`${vkey}`, /<vkey>=<url>/],
      [`${logKey}=https://w.example`, /<vkey>=<url>|0x04/],
      [`${vkey}=ftp://w.example`, /http\(s\)/],
      [`${vkey}=https://user:pw@w.example`, /credentials/],
      [`${vkey}=https://a.example,${vkey}=https://b.example`, /twice/],
    ] as const) {
      assert.throws(
        () => loadConfig({ CUSTOS_AUDIT_WITNESSES: value }, '/tmp'),
        (e: unknown) =>
          e instanceof ConfigError && e.variable === 'CUSTOS_AUDIT_WITNESSES' && why.test(e.message),
        value,
      );
    }
    const production = {
      CUSTOS_ENV: 'production',
      CUSTOS_DATABASE_URL: 'postgres://u@db1:5432/r',
      CUSTOS_AUDIT_DATABASE_URL: 'postgres://u@db2:5432/a',
      CUSTOS_KEYRING_PASSPHRASE: 'x'.repeat(32),
      CUSTOS_TRUSTED_PROXIES: '127.0.0.1',
      CUSTOS_PUBLIC_URL: 'https://custos.example',
    };
    assert.throws(
      () => loadConfig({ ...production, CUSTOS_AUDIT_WITNESSES: `${vkey}=http://w.example` }, '/tmp'),
      (e: unknown) => e instanceof ConfigError && /https/.test(e.message),
    );
    assert.equal(
      loadConfig({ ...production, CUSTOS_AUDIT_WITNESSES: `${vkey}=https://w.example` }, '/tmp')
        .auditWitnesses.length,
      1,
    );
  });
});
