import { createCipheriv, createDecipheriv, createHmac, randomBytes } from 'node:crypto';
import { CustosError } from '../kernel/errors.ts';
import { freshNonce } from '../kernel/nonce.ts';
import type { SqlDriver, SqlQueryable } from '../store/sql-driver.ts';
import { KeyProviderError, type KeyProvider } from './key-provider.ts';
import type { SensitivityClass } from './protection-policy.ts';

/**
 * Envelope encryption of protected elements (issue 5).
 *
 * - A data key (DEK, 32 random bytes) per project and key epoch, stored only wrapped by the key
 *   provider's key-encryption key (KEK) in `data_key`; the KEK never leaves the provider.
 * - One AEAD operation per sensitivity class per resource version: AES-256-GCM (node:crypto) under
 *   a subkey HKDF-SHA-256(DEK, info = project|type|id|version|class), with a random 96-bit nonce.
 *   The per-record subkey keeps every key far below GCM's 2^32 random-nonce limit whatever the
 *   volume, and the associated data binds project, type, id, version and class, so a ciphertext
 *   moved to another record, version or class fails to open.
 * - Blind indexes: HMAC-SHA-256 under a separate per-project key, truncated (see `blindBits`).
 * - Unwrapped keys are cached in memory for at most `maxAgeMs` and `maxUses` operations; every
 *   unwrap (cache miss) is reported to `onUnwrap` (the key access log in the audit trail). The
 *   current epoch of a project is cached for `epochCacheMs` (see {@link EPOCH_CACHE_MS}), so a
 *   write needs no key query in the steady state.
 */
export interface SealContext {
  projectId: string;
  type: string;
  id: string;
  version: number;
  cls: SensitivityClass;
}

interface CachedKey {
  key: Buffer;
  expires: number;
  uses: number;
}

export interface EnvelopeOptions {
  db: SqlDriver;
  provider: KeyProvider;
  /** Called after every unwrap from the provider; a failure to record it fails the operation. */
  onUnwrap: (e: { projectId: string; epoch: number; kind: 'data' | 'blind' }) => Promise<void>;
  maxAgeMs?: number;
  maxUses?: number;
  /** Output size of blind indexes in bits (16–64); see docs/encryption.md. */
  blindBits?: number;
  /** How long a cached current epoch is trusted (default {@link EPOCH_CACHE_MS}; 0: never cached). */
  epochCacheMs?: number;
}

const AAD_PREFIX = 'custos:seal:v1';
export const DEFAULT_CACHE = { maxAgeMs: 5 * 60_000, maxUses: 1_000_000 };

function aad(ctx: SealContext): Buffer {
  return Buffer.from(
    `${AAD_PREFIX}|${ctx.projectId}|${ctx.type}|${ctx.id}|${ctx.version}|${ctx.cls}`,
    'utf8',
  );
}
function wrapAad(projectId: string, epoch: number, kind: 'data' | 'blind'): Buffer {
  return Buffer.from(`custos:dek:v1|${kind}|${projectId}|${epoch}`, 'utf8');
}

/**
 * HKDF-SHA-256 (RFC 5869) with an empty salt and a 32-byte output, computed with node's HMAC:
 * extract PRK = HMAC-SHA-256(salt, IKM) (an absent salt is HashLen zeros, section 2.2; HMAC pads a
 * key to the block size with zeros, so an empty key and 32 zero bytes are the same key), then
 * expand T(1) = HMAC-SHA-256(PRK, info || 0x01), which is the whole output for L = 32 (section
 * 2.3). The bytes are those of `hkdfSync('sha256', ikm, '', info, 32)` (test/envelope-cache.test.ts
 * compares them on random inputs): nothing stored changes. Why not `hkdfSync`: it costs 8–17 µs a
 * call against about 2 µs for the one expand HMAC, because the extract step depends only on the
 * data key and is done once per key (below) instead of once per record.
 */
const HKDF_ZERO_SALT = Buffer.alloc(32);
const HKDF_BLOCK_1 = Buffer.from([1]);
/**
 * PRKs per data-key Buffer (held only as long as the Buffer itself is). The entry keeps a copy of
 * the key it was derived from and is recomputed if the Buffer's bytes ever change, so a PRK never
 * outlives or mismatches the key it came from.
 */
const prks = new WeakMap<Buffer, { ikm: Buffer; prk: Buffer }>();
export function hkdfSubkey(ikm: Buffer, info: Buffer): Buffer {
  let e = prks.get(ikm);
  if (!e || !e.ikm.equals(ikm)) {
    e = { ikm: Buffer.from(ikm), prk: createHmac('sha256', HKDF_ZERO_SALT).update(ikm).digest() };
    prks.set(ikm, e);
  }
  return createHmac('sha256', e.prk).update(info).update(HKDF_BLOCK_1).digest();
}

interface SealedParts {
  epoch: number;
  nonce: string;
  body: string;
}

/** The parts of `v1.<epoch>.<nonce>.<ciphertext+tag>`; anything else is SEALED_DATA_INVALID. */
function parseSealed(blob: string): SealedParts {
  const m = /^v1\.(\d{1,9})\.([A-Za-z0-9_-]{16})\.([A-Za-z0-9_-]{22,})$/.exec(blob);
  if (!m) throw new CustosError('SEALED_DATA_INVALID');
  return { epoch: Number(m[1]), nonce: m[2]!, body: m[3]! };
}

function openWith(dek: Buffer, ctx: SealContext, parts: SealedParts): Buffer {
  const info = aad(ctx);
  const subkey = hkdfSubkey(dek, info);
  const body = Buffer.from(parts.body, 'base64url');
  try {
    const decipher = createDecipheriv('aes-256-gcm', subkey, Buffer.from(parts.nonce, 'base64url'));
    decipher.setAAD(info);
    decipher.setAuthTag(body.subarray(body.length - 16));
    return Buffer.concat([decipher.update(body.subarray(0, body.length - 16)), decipher.final()]);
  } catch {
    throw new CustosError('SEALED_DATA_INVALID');
  } finally {
    subkey.fill(0);
  }
}

/**
 * How long a process trusts its cached current epoch of a project (ms). A rotation in this process
 * updates the cache at once; one made by another process (another server on the same database, or
 * `custos keys rotate` run in-process while no server listens) is seen within this bound, and
 * writes in between seal under the previous epoch, which stays readable (docs/encryption.md).
 */
export const EPOCH_CACHE_MS = 2000;

export class Envelope {
  private readonly cache = new Map<string, CachedKey>();
  /** The current epoch per project, trusted until `expires` (see {@link EPOCH_CACHE_MS}). */
  private readonly epochs = new Map<string, { epoch: number; expires: number }>();
  /** A lookup of the current epoch in flight per project: concurrent writes share it. */
  private readonly epochLookups = new Map<string, Promise<number>>();
  private readonly maxAgeMs: number;
  private readonly maxUses: number;
  private readonly epochCacheMs: number;
  readonly blindBits: number;

  constructor(private readonly o: EnvelopeOptions) {
    this.maxAgeMs = o.maxAgeMs ?? DEFAULT_CACHE.maxAgeMs;
    this.maxUses = o.maxUses ?? DEFAULT_CACHE.maxUses;
    this.epochCacheMs = o.epochCacheMs ?? EPOCH_CACHE_MS;
    this.blindBits = Math.min(Math.max(o.blindBits ?? 32, 16), 64);
  }

  get provider(): KeyProvider {
    return this.o.provider;
  }

  /**
   * The epoch new writes of a project use, creating the project's first keys when needed. Served
   * from memory for up to `epochCacheMs` after it was read or set; a rotation in this process sets
   * it at once.
   */
  async currentEpoch(projectId: string): Promise<number> {
    const hit = this.epochs.get(projectId);
    if (hit && hit.expires > Date.now()) return hit.epoch;
    let lookup = this.epochLookups.get(projectId);
    if (!lookup) {
      lookup = this.lookupEpoch(projectId).finally(() => this.epochLookups.delete(projectId));
      this.epochLookups.set(projectId, lookup);
    }
    return lookup;
  }

  private async lookupEpoch(projectId: string): Promise<number> {
    const r = await this.o.db.query<{ epoch: number }>(
      `SELECT max(epoch) AS epoch FROM data_key WHERE project_id = $1 AND kind = 'data' AND state = 'active'`,
      [projectId],
    );
    const found = r.rows[0]?.epoch;
    const epoch =
      found !== null && found !== undefined ? Number(found) : await this.newEpoch(projectId, true);
    this.rememberEpoch(projectId, epoch);
    return this.epochs.get(projectId)?.epoch ?? epoch;
  }

  private rememberEpoch(projectId: string, epoch: number): void {
    // Never step back: a read that started before a rotation in this process may finish after it.
    const hit = this.epochs.get(projectId);
    if (hit && hit.epoch > epoch && hit.expires > Date.now()) return;
    if (this.epochCacheMs > 0) this.epochs.set(projectId, { epoch, expires: Date.now() + this.epochCacheMs });
  }

  /**
   * A new key epoch: a new KEK in the provider and a new data key wrapped by it (and, the first
   * time, the project's blind-index key). New writes use it at once; older epochs stay readable.
   */
  async rotate(projectId: string): Promise<number> {
    const epoch = await this.newEpoch(projectId, false);
    this.epochs.delete(projectId);
    this.rememberEpoch(projectId, epoch);
    return epoch;
  }

  /**
   * Creates the next epoch under the project's key lock. `ifNone`: only when the project has no
   * active data key yet (its first write); concurrent first writes then share one epoch instead of
   * each creating one.
   */
  private async newEpoch(projectId: string, ifNone: boolean): Promise<number> {
    return this.o.db.lockedTransaction(`custos-keys-${projectId}`, async (q) => {
      if (ifNone) {
        const active = await q.query<{ epoch: number | null }>(
          `SELECT max(epoch) AS epoch FROM data_key WHERE project_id = $1 AND kind = 'data' AND state = 'active'`,
          [projectId],
        );
        const e = active.rows[0]?.epoch;
        if (e !== null && e !== undefined) return Number(e);
      }
      const r = await q.query<{ epoch: number | null }>(
        `SELECT max(epoch) AS epoch FROM data_key WHERE project_id = $1 AND kind = 'data'`,
        [projectId],
      );
      const epoch = Number(r.rows[0]?.epoch ?? 0) + 1;
      const handle = await this.o.provider.createKek(`custos-${projectId}-${epoch}`);
      await this.storeNewKey(q, projectId, epoch, 'data', handle);
      const blind = await q.query(`SELECT 1 FROM data_key WHERE project_id = $1 AND kind = 'blind'`, [
        projectId,
      ]);
      if (blind.rows.length === 0) await this.storeNewKey(q, projectId, 0, 'blind', handle);
      return epoch;
    });
  }

  private async storeNewKey(
    q: SqlQueryable,
    projectId: string,
    epoch: number,
    kind: 'data' | 'blind',
    handle: string,
  ): Promise<void> {
    const key = randomBytes(32);
    const wrapped = await this.o.provider.wrap(handle, key, wrapAad(projectId, epoch, kind));
    await q.query(
      `INSERT INTO data_key (project_id, kind, epoch, provider, kek_handle, wrapped, state) VALUES ($1, $2, $3, $4, $5, $6, 'active')`,
      [projectId, kind, epoch, this.o.provider.kind, handle, wrapped],
    );
    key.fill(0);
  }

  private async key(
    projectId: string,
    epoch: number,
    kind: 'data' | 'blind',
    q: SqlQueryable = this.o.db,
  ): Promise<Buffer> {
    const id = `${kind}|${projectId}|${epoch}`;
    const now = Date.now();
    const live = this.cached(id);
    if (live) return live;
    // An expired or used-up key is dropped, never zeroed: a write that called `prepareWrite` before
    // the eviction may still be sealing with this very Buffer, and zeroing it would seal under an
    // all-zero key. The garbage collector reclaims it once the last holder is done.
    this.cache.delete(id);
    const r = await q.query<{ kek_handle: string; wrapped: Uint8Array; state: string }>(
      'SELECT kek_handle, wrapped, state FROM data_key WHERE project_id = $1 AND kind = $2 AND epoch = $3',
      [projectId, kind, epoch],
    );
    const row = r.rows[0];
    if (!row) throw new CustosError('KEY_UNAVAILABLE');
    if (row.state === 'destroyed') throw new CustosError('KEY_DESTROYED');
    let key: Buffer;
    try {
      key = await this.o.provider.unwrap(
        row.kek_handle,
        Buffer.from(row.wrapped),
        wrapAad(projectId, epoch, kind),
      );
    } catch (e) {
      if (e instanceof KeyProviderError) {
        throw new CustosError(
          // An unknown key is most often a keyring or HSM other than the one this data was written
          // with (a restore without its keys): unavailable, not destroyed.
          e.code === 'destroyed' ? 'KEY_DESTROYED' : 'KEY_UNAVAILABLE',
        );
      }
      throw e;
    }
    await this.o.onUnwrap({ projectId, epoch, kind });
    this.cache.set(id, { key, expires: now + this.maxAgeMs, uses: 1 });
    return key;
  }

  /** Loads (and caches) what a write needs before its transaction opens. */
  async prepareWrite(projectId: string): Promise<{ epoch: number; dek: Buffer; blindKey: Buffer }> {
    const epoch = await this.currentEpoch(projectId);
    return {
      epoch,
      dek: await this.key(projectId, epoch, 'data'),
      blindKey: await this.key(projectId, 0, 'blind'),
    };
  }

  /** A live cached key, counted as one use; undefined when absent, expired or used up. */
  private cached(id: string): Buffer | undefined {
    const hit = this.cache.get(id);
    if (!hit || hit.expires <= Date.now() || hit.uses >= this.maxUses) return undefined;
    hit.uses++;
    return hit.key;
  }

  /** The blind-index key, read through `q` (inside a transaction). */
  async blindKeyIn(projectId: string, q: SqlQueryable): Promise<Buffer | undefined> {
    const hit = this.cached(`blind|${projectId}|0`);
    if (hit) return hit;
    const r = await q.query(`SELECT 1 FROM data_key WHERE project_id = $1 AND kind = 'blind'`, [projectId]);
    return r.rows.length === 0 ? undefined : this.key(projectId, 0, 'blind', q);
  }

  async blindKey(projectId: string): Promise<Buffer | undefined> {
    const hit = this.cached(`blind|${projectId}|0`);
    if (hit) return hit;
    const r = await this.o.db.query(`SELECT 1 FROM data_key WHERE project_id = $1 AND kind = 'blind'`, [
      projectId,
    ]);
    return r.rows.length === 0 ? undefined : this.key(projectId, 0, 'blind');
  }

  /** Seals one class of one version: `v1.<epoch>.<nonce>.<ciphertext+tag>` (base64url parts). */
  static seal(dek: Buffer, epoch: number, ctx: SealContext, plaintext: Buffer): string {
    const info = aad(ctx);
    const subkey = hkdfSubkey(dek, info);
    const nonce = freshNonce();
    const cipher = createCipheriv('aes-256-gcm', subkey, nonce);
    cipher.setAAD(info);
    const ct = Buffer.concat([cipher.update(plaintext), cipher.final(), cipher.getAuthTag()]);
    subkey.fill(0);
    return `v1.${epoch}.${nonce.toString('base64url')}.${ct.toString('base64url')}`;
  }

  /** Opens a sealed class; a moved, altered or truncated ciphertext fails with SEALED_DATA_INVALID. */
  async open(ctx: SealContext, blob: string, q?: SqlQueryable): Promise<Buffer> {
    const parts = parseSealed(blob);
    const dek =
      this.cached(`data|${ctx.projectId}|${parts.epoch}`) ??
      (await this.key(ctx.projectId, parts.epoch, 'data', q));
    return openWith(dek, ctx, parts);
  }

  /**
   * `open` without waiting: the plaintext when the data key is in the cache, undefined when it is
   * not (then `open` unwraps it). Reads call this first: most find their key cached, and a
   * synchronous open saves the promise machinery of two awaits per class.
   */
  openCached(ctx: SealContext, blob: string): Buffer | undefined {
    const parts = parseSealed(blob);
    const dek = this.cached(`data|${ctx.projectId}|${parts.epoch}`);
    return dek && openWith(dek, ctx, parts);
  }

  /**
   * A blind index of an exact-match key: HMAC-SHA-256 under the project's blind-index key,
   * truncated to `blindBits`. Truncation is the point: a leaked index maps each value to a bucket
   * shared with many other possible values, so it cannot be reversed by enumeration alone; the
   * search verifies candidates after decryption.
   */
  static blind(blindKey: Buffer, bits: number, key: string): string {
    const mac = createHmac('sha256', blindKey).update(key, 'utf8').digest();
    const bytes = Math.ceil(bits / 8);
    const out = Buffer.from(mac.subarray(0, bytes));
    const extra = bytes * 8 - bits;
    if (extra > 0) out[bytes - 1]! &= (0xff << extra) & 0xff;
    return out.toString('base64url');
  }

  /**
   * Forgets cached keys and epochs (after a rotation or a KEK destruction; tests). References are dropped, not
   * zeroed, for the same reason as on eviction: an operation in flight may still hold one.
   */
  clearCache(): void {
    this.cache.clear();
    this.epochs.clear();
  }
}

/**
 * Output size of blind indexes, planned as CipherSweet's planner does: with R the expected number
 * of indexed rows, coincidences per index value C = R / 2^L should satisfy 2 <= C < sqrt(R), so
 * that a leaked index value always stands for several rows (ambiguous) while a search still narrows
 * to few candidates (which the gateway decrypts and re-checks). The largest L in that range is
 * floor(log2(R)) - 1; clamped to 16..32 bits.
 */
export function planBlindBits(expectedRows: number): number {
  const r = Math.max(expectedRows, 4);
  return Math.min(32, Math.max(16, Math.floor(Math.log2(r)) - 1));
}

/**
 * The blind form of an exact-match index key `code=value`: `code=#b:<truncated HMAC>`. Writes
 * store it for protected values; searches compute it for every exact criterion on a parameter
 * that may hold protected values.
 */
export function blindIndexKey(blindKey: Buffer, bits: number, key: string): string {
  const eq = key.indexOf('=');
  return `${key.slice(0, eq)}=#b:${Envelope.blind(blindKey, bits, key)}`;
}

/**
 * The index keys protected elements contribute, from the exact-match keys of the projection (a
 * resource holding only the protected elements): for each parameter `isProtected` names, its exact
 * keys in blind form and its presence key (`code?`) as is. Keys of other parameters are dropped:
 * searches compute blind forms only for protected parameters, so theirs could never match, and
 * what an expression yields over the projection describes the projection, not the resource (Patient
 * `deceased` yields `false` on it). Their keys come from the redacted resource.
 */
export function protectedIndexKeys(
  projectionKeys: readonly string[],
  isProtected: (code: string) => boolean,
  blindKey: Buffer,
  bits: number,
): string[] {
  const out: string[] = [];
  for (const k of projectionKeys) {
    // `code=value`, `code:modifier=value` (of-type, identifier), `code?`
    const end = k.search(/[:=?]/);
    if (end <= 0 || !isProtected(k.slice(0, end))) continue;
    out.push(k.endsWith('?') ? k : blindIndexKey(blindKey, bits, k));
  }
  return out;
}
