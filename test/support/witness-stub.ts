import { createHash, createPublicKey, generateKeyPairSync, sign, verify, type KeyObject } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';

/**
 * A STUB of a transparency-log witness for tests — not a real witness (no public witness is
 * reachable from here): a local HTTP server speaking the C2SP tlog-witness `add-checkpoint` protocol
 * as a witness would, with an Ed25519 key of its own, cosigning per C2SP tlog-cosignature
 * (`cosignature/v1`).
 *
 * What it does like a witness (https://c2sp.org/tlog-witness): it trusts the log keys it is told
 * ({@link WitnessStub.trust}) and, per origin, keeps the size and root hash of the last checkpoint it
 * cosigned. It answers 404 for an unknown origin, 403 when no trusted signature verifies, 400 for an
 * old size above the checkpoint's or a malformed body, 409 (Content-Type text/x.tlog.size, its size
 * and a newline) when `old` is not its size or, at equal sizes, the roots differ, 422 when the
 * consistency proof does not verify (or is not empty for old 0), and otherwise stores the new
 * checkpoint before answering 200 with one cosignature line. Requests are handled one at a time
 * (the check and the update are atomic, as the spec requires).
 *
 * Deliberately independent of src/audit: its own note parsing, Ed25519 note verification (key ID
 * type 0x01), cosignature encoding (key ID type 0x04) and a straightforward RFC 9162 §2.1.4.2
 * consistency verifier, so that a shared misreading of a spec does not pass unnoticed.
 *
 * Not like a witness: state lives in memory (a "restart" is a new stub given a state), there is no
 * monitoring prefix, and {@link WitnessStub.misbehave} makes it lie on purpose for negative tests.
 */
export interface WitnessStubRequest {
  old: number | undefined;
  proofLines: number;
  treeSize: number | undefined;
  status: number;
  body: string;
}

export type Misbehaviour =
  /** Cosigns with another key, under this witness's name and key ID (a forged cosignature). */
  | 'wrong-key'
  /** Cosigns a checkpoint text other than the one submitted (another root hash). */
  | 'altered'
  /** Answers 200 with a cosignature from an unrelated key only. */
  | 'foreign-only'
  /** Answers 409 with a different size every time. */
  | 'flapping-409'
  /** Accepts the request and never answers. */
  | 'hang';

export interface WitnessStubState {
  size: number;
  root: Buffer;
}

export interface WitnessStub {
  /** The submission prefix: http://127.0.0.1:PORT/<prefix>. */
  url: string;
  port: number;
  name: string;
  privateKey: KeyObject;
  /** The witness's verifier key, signature type 0x04. */
  vkey: string;
  /** Every request, in order. */
  requests: WitnessStubRequest[];
  /** Trust a log's note verifier key (type 0x01); its name is the log's origin. */
  trust(logVkey: string): void;
  /** What it last cosigned for an origin. */
  state(origin: string): WitnessStubState | undefined;
  misbehave: Misbehaviour | undefined;
  close(): Promise<void>;
}

const NODE = Buffer.from([0x01]);
const SPKI_ED25519_PREFIX = Buffer.from('302a300506032b6570032100', 'hex');

const sha256 = (...parts: Buffer[]) => {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest();
};

function rawPublic(key: KeyObject): Buffer {
  const der = createPublicKey(key).export({ format: 'der', type: 'spki' });
  return Buffer.from(der.subarray(der.length - 32));
}

/** SHA-256(name || 0x0A || type || key)[:4] (C2SP signed-note; tlog-cosignature for type 0x04). */
function keyHash(name: string, type: number, pub: Buffer): Buffer {
  return sha256(Buffer.from(name, 'utf8'), Buffer.from([0x0a, type]), pub).subarray(0, 4);
}

/** The vkey of a cosigner key: name+hex(keyid)+base64(0x04 || key). */
export function cosignerVkey(name: string, key: KeyObject): string {
  const pub = rawPublic(key);
  return `${name}+${keyHash(name, 0x04, pub).toString('hex')}+${Buffer.concat([Buffer.from([0x04]), pub]).toString('base64')}`;
}

/** A cosignature/v1 line by `key` (any key: tests forge with it) over a checkpoint text. */
export function cosign(name: string, key: KeyObject, text: string, time: number, keyId?: Buffer): string {
  const msg = Buffer.from(`cosignature/v1\ntime ${time}\n${text}`, 'utf8');
  const ts = Buffer.alloc(8);
  ts.writeBigUInt64BE(BigInt(time));
  const id = keyId ?? keyHash(name, 0x04, rawPublic(key));
  return `\u2014 ${name} ${Buffer.concat([id, ts, sign(null, msg, key)]).toString('base64')}`;
}

/** Checks a cosignature line against a cosigner's raw public key, independently of src/audit. */
export function cosignatureVerifies(line: string, name: string, pub: Buffer, text: string): boolean {
  const m = /^\u2014 (\S+) (\S+)$/u.exec(line);
  if (!m || m[1] !== name) return false;
  const raw = Buffer.from(m[2]!, 'base64');
  if (raw.length !== 76 || !raw.subarray(0, 4).equals(keyHash(name, 0x04, pub))) return false;
  const time = raw.readBigUInt64BE(4);
  const key = createPublicKey({
    key: Buffer.concat([SPKI_ED25519_PREFIX, pub]),
    format: 'der',
    type: 'spki',
  });
  return verify(null, Buffer.from(`cosignature/v1\ntime ${time}\n${text}`, 'utf8'), key, raw.subarray(12));
}

/**
 * RFC 9162 §2.1.4.2, step by step as the RFC writes it (first = old size, second = new size).
 * Sizes here are small, so plain numbers and Math.floor stand in for the right shifts.
 */
export function consistencyVerifies(
  first: number,
  second: number,
  proof: Buffer[],
  firstHash: Buffer,
  secondHash: Buffer,
): boolean {
  if (first === 0 || first > second) return false;
  if (first === second) return proof.length === 0 && firstHash.equals(secondHash);
  if (proof.length === 0) return false;
  // 1. If first is an exact power of 2, prepend first_hash to the consistency_path array.
  const path = (first & (first - 1)) === 0 ? [firstHash, ...proof] : [...proof];
  // 2. fn = first - 1, sn = second - 1.
  let fn = first - 1;
  let sn = second - 1;
  // 3. If LSB(fn) is set, right-shift both fn and sn equally until LSB(fn) is not set.
  while (fn % 2 === 1) {
    fn = Math.floor(fn / 2);
    sn = Math.floor(sn / 2);
  }
  // 4. Set both fr and sr to the first value in the consistency_path array.
  let fr = path[0]!;
  let sr = path[0]!;
  // 5. For each subsequent value c in the consistency_path array:
  for (const c of path.slice(1)) {
    // a. If sn is 0, then stop the iteration and fail the proof verification.
    if (sn === 0) return false;
    // b. If LSB(fn) is set, or if fn is equal to sn, then:
    if (fn % 2 === 1 || fn === sn) {
      fr = sha256(NODE, c, fr);
      sr = sha256(NODE, c, sr);
      // If LSB(fn) is not set, right-shift fn and sn until either LSB(fn) is set or fn is 0.
      while (fn % 2 === 0 && fn !== 0) {
        fn = Math.floor(fn / 2);
        sn = Math.floor(sn / 2);
      }
    } else {
      // Otherwise: set sr to HASH(0x01 || sr || c).
      sr = sha256(NODE, sr, c);
    }
    // c. Finally, right-shift both fn and sn one time.
    fn = Math.floor(fn / 2);
    sn = Math.floor(sn / 2);
  }
  // 6. fr equal to first_hash, sr equal to second_hash and sn equal to 0.
  return fr.equals(firstHash) && sr.equals(secondHash) && sn === 0;
}

class Refusal extends Error {
  constructor(
    readonly status: number,
    readonly body = '',
    readonly type = 'text/plain; charset=utf-8',
  ) {
    super(`refused with ${status}`);
  }
}

interface LogKey {
  name: string;
  keyId: Buffer;
  key: KeyObject;
}

function parseLogVkey(vkey: string): LogKey {
  // The base64 part may itself hold '+': split at the first two only.
  const [, name, hex, b64] = /^([^+]+)\+([0-9a-f]{8})\+(.+)$/.exec(vkey) ?? [];
  const raw = Buffer.from(b64 ?? '', 'base64');
  if (!name || !hex || raw.length !== 33 || raw[0] !== 0x01) throw new Error('not an Ed25519 note vkey');
  const pub = raw.subarray(1);
  if (keyHash(name, 0x01, pub).toString('hex') !== hex) throw new Error('vkey key ID mismatch');
  return {
    name,
    keyId: Buffer.from(hex, 'hex'),
    key: createPublicKey({ key: Buffer.concat([SPKI_ED25519_PREFIX, pub]), format: 'der', type: 'spki' }),
  };
}

const strictB64 = (s: string): Buffer | undefined => {
  const b = Buffer.from(s, 'base64');
  return b.toString('base64') === s ? b : undefined;
};

/** Starts the stub on 127.0.0.1: a free port unless `port` is given (a restart keeps its port). */
export async function startWitnessStub(
  opts: {
    port?: number;
    name?: string;
    privateKey?: KeyObject;
    prefix?: string;
    /** Trusted log vkeys. */
    trusted?: string[];
    /** What it "remembers" at start: origin → last cosigned checkpoint. */
    state?: Record<string, WitnessStubState>;
  } = {},
): Promise<WitnessStub> {
  const name = opts.name ?? 'witness.test/w1';
  const privateKey = opts.privateKey ?? generateKeyPairSync('ed25519').privateKey;
  const prefix = opts.prefix ?? '/w1';
  const trusted = new Map<string, LogKey[]>();
  const state = new Map<string, WitnessStubState>(Object.entries(opts.state ?? {}));
  const requests: WitnessStubRequest[] = [];
  const forger = generateKeyPairSync('ed25519').privateKey;
  let flap = 1;

  const handle = (body: string, rec: WitnessStubRequest, stub: WitnessStub): string => {
    // "old <size>\n", proof lines, "\n", then the checkpoint note.
    const lines = body.split('\n');
    const m = /^old (0|[1-9][0-9]*)$/.exec(lines[0] ?? '');
    if (!m) throw new Refusal(400);
    const old = Number(m[1]);
    rec.old = old;
    const proof: Buffer[] = [];
    let i = 1;
    for (; i < lines.length && lines[i] !== ''; i++) {
      const h = strictB64(lines[i]!);
      if (!h || h.length !== 32) throw new Refusal(400);
      proof.push(h);
    }
    rec.proofLines = proof.length;
    if (i >= lines.length || proof.length > 63) throw new Refusal(400);
    const note = lines.slice(i + 1).join('\n');
    const split = note.lastIndexOf('\n\n');
    if (!note.endsWith('\n') || split < 0) throw new Refusal(400);
    const text = note.slice(0, split + 1);
    const [origin, sizeLine, rootLine] = text.split('\n');
    if (!origin || !/^(0|[1-9][0-9]*)$/.test(sizeLine ?? '')) throw new Refusal(400);
    const size = Number(sizeLine);
    const root = strictB64(rootLine ?? '');
    if (!root || root.length !== 32) throw new Refusal(400);
    rec.treeSize = size;
    const keys = trusted.get(origin);
    if (!keys) throw new Refusal(404);
    // "it MUST ignore signatures from unknown keys"; 403 unless one trusted signature verifies.
    const verified = note
      .slice(split + 2, -1)
      .split('\n')
      .some((l) => {
        const s = /^\u2014 (\S+) (\S+)$/u.exec(l);
        const raw = s && strictB64(s[2]!);
        if (!s || !raw || raw.length !== 68) return false;
        const k = keys.find((k) => k.name === s[1] && k.keyId.equals(raw.subarray(0, 4)));
        return !!k && verify(null, Buffer.from(text, 'utf8'), k.key, raw.subarray(4));
      });
    if (!verified) throw new Refusal(403);
    if (old > size) throw new Refusal(400);
    const known = state.get(origin);
    const knownSize = known?.size ?? 0;
    if (stub.misbehave === 'flapping-409') throw new Refusal(409, `${flap++}\n`, 'text/x.tlog.size');
    if (old !== knownSize) throw new Refusal(409, `${knownSize}\n`, 'text/x.tlog.size');
    if (old === 0) {
      if (proof.length !== 0) throw new Refusal(422);
    } else if (old === size) {
      if (proof.length !== 0) throw new Refusal(422);
      if (!known!.root.equals(root)) throw new Refusal(409, `${knownSize}\n`, 'text/x.tlog.size');
    } else if (!consistencyVerifies(old, size, proof, known!.root, root)) {
      throw new Refusal(422);
    }
    state.set(origin, { size, root });
    const now = Math.floor(Date.now() / 1000);
    switch (stub.misbehave) {
      case 'wrong-key':
        return `${cosign(name, forger, text, now, keyHash(name, 0x04, rawPublic(privateKey)))}\n`;
      case 'altered': {
        const other = `${origin}\n${size}\n${Buffer.alloc(32, 7).toString('base64')}\n`;
        return `${cosign(name, privateKey, other, now)}\n`;
      }
      case 'foreign-only':
        return `${cosign('witness.test/someone-else', forger, text, now)}\n`;
      default:
        return `${cosign(name, privateKey, text, now)}\n`;
    }
  };

  // eslint-disable-next-line prefer-const
  let stub: WitnessStub;
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks).toString('utf8');
      const rec: WitnessStubRequest = { old: undefined, proofLines: 0, treeSize: undefined, status: 0, body };
      requests.push(rec);
      if (req.method !== 'POST' || req.url !== `${prefix}/add-checkpoint`) {
        rec.status = 404;
        res.writeHead(404).end();
        return;
      }
      if (stub.misbehave === 'hang') return; // never answers
      try {
        const out = handle(body, rec, stub);
        rec.status = 200;
        res.writeHead(200, { 'content-type': 'text/plain; charset=utf-8' }).end(out);
      } catch (e) {
        if (!(e instanceof Refusal)) throw e;
        rec.status = e.status;
        res.writeHead(e.status, { 'content-type': e.type }).end(e.body);
      }
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port ?? 0, '127.0.0.1', () => resolve());
  });
  const port = (server.address() as AddressInfo).port;
  stub = {
    url: `http://127.0.0.1:${port}${prefix}`,
    port,
    name,
    privateKey,
    vkey: cosignerVkey(name, privateKey),
    requests,
    trust(logVkey) {
      const k = parseLogVkey(logVkey);
      trusted.set(k.name, [...(trusted.get(k.name) ?? []), k]);
    },
    state: (origin) => state.get(origin),
    misbehave: undefined,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
  for (const v of opts.trusted ?? []) stub.trust(v);
  return stub;
}
