import { createCipheriv, createDecipheriv, createHash, randomBytes, scrypt } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { KeyProviderError, type KeyProvider } from './key-provider.ts';

/**
 * The `local` key provider: KEKs kept in a keyring file sealed under a passphrase.
 *
 * File format (version 1), JSON:
 *
 * ```json
 * { "format": "custos-local-keyring", "version": 1,
 *   "kdf":  { "alg": "scrypt", "N": 131072, "r": 8, "p": 1, "salt": "<base64, 16 bytes>" },
 *   "seal": { "alg": "A256GCM", "nonce": "<base64, 12 bytes>", "ciphertext": "<base64, body and tag>" } }
 * ```
 *
 * The master key is scrypt(passphrase, salt, N, r, p) → 32 bytes; it seals the whole body
 * (every KEK, 32 random bytes each) with AES-256-GCM, the header (`format`, `version`, `kdf`) as
 * associated data, so nobody can weaken the recorded KDF parameters without the open failing.
 * N = 2^17, r = 8, p = 1 costs 128 MiB of memory (128·N·r bytes) and about 0.3–0.8 s per open on
 * one core: paid once when the keyring is opened (the master key is kept while it is open), and
 * the scrypt paper's and OWASP's interactive-login figure raised for a secret that is opened
 * rarely. A keyring may record N from 2^15 to 2^20; anything else is refused before deriving (a
 * tampered header cannot make us allocate gigabytes).
 *
 * A wrap is `0x01 ‖ nonce (12) ‖ AES-256-GCM(KEK, nonce, dataKey, aad) ‖ tag (16)`, 61 bytes.
 *
 * The file is rewritten atomically (temp file in the same directory, fsync, rename, fsync of the
 * directory) with mode 0600; a keyring readable by group or others is refused on open, as ssh
 * refuses such a private key. Several processes may share one keyring file (several Custos servers
 * on one PostgreSQL): every change re-reads the file and merges under an exclusive lock file
 * (`<keyring>.lock`), so none loses another's KEKs or tombstones, and before every wrap and unwrap
 * a process re-reads the file if it changed, so it sees KEKs another process created and stops
 * using one another process destroyed. A passphrase changed by another process needs a restart.
 *
 * Crypto-shredding: `destroyKek` removes the KEK from the file (a tombstone records the handle so
 * unwrap answers `destroyed`), but every older copy of the file (backups, escrow copies, snapshots
 * of the disk) still holds it, under the passphrase it had then. Shredding is complete only once
 * those copies are destroyed too or re-made from the current file: docs/keys.md.
 *
 * @example
 * ```ts
 * const keyring = await openLocalKeyring('/var/lib/custos/keys/keyring.json', passphrase, { create: true });
 * const handle = await keyring.createKek('project-a.epoch-1');
 * const wrapped = await keyring.wrap(handle, dataKey, aad);
 * ```
 */

const FORMAT = 'custos-local-keyring';
const VERSION = 1;
const WRAP_VERSION = 0x01;
const NONCE_BYTES = 12;
const TAG_BYTES = 16;
const KEY_BYTES = 32;
const WRAPPED_BYTES = 1 + NONCE_BYTES + KEY_BYTES + TAG_BYTES;

/** scrypt cost recorded in new keyrings: N = 2^17 (128 MiB with r = 8). */
export const DEFAULT_SCRYPT_LOG2N = 17;
const MIN_LOG2N = 15;
const MAX_LOG2N = 20;
const SCRYPT_R = 8;
const SCRYPT_P = 1;

export interface LocalKeyringOptions {
  /** Create an empty keyring when the file does not exist (default false: a missing file is an error). */
  create?: boolean;
  /** log2 of scrypt's N for a keyring created now, 15–20 (default 17). Existing keyrings keep theirs. */
  scryptLog2N?: number;
}

interface KdfHeader {
  alg: 'scrypt';
  N: number;
  r: number;
  p: number;
  salt: string;
}

interface KeyringFile {
  format: string;
  version: number;
  kdf: KdfHeader;
  seal: { alg: 'A256GCM'; nonce: string; ciphertext: string };
}

interface KekEntry {
  keyId: string;
  kek: Buffer;
  created: string;
}

interface Body {
  keks: { handle: string; keyId: string; kek: string; created: string }[];
  destroyed: { handle: string; destroyedAt: string }[];
}

const KEY_ID = /^[A-Za-z0-9._:/-]{1,128}$/;

function checkKeyId(keyId: string): void {
  if (!KEY_ID.test(keyId)) throw new RangeError('keyId must be 1–128 characters of [A-Za-z0-9._:/-]');
}

function checkDataKey(dataKey: Buffer): void {
  if (!Buffer.isBuffer(dataKey) || dataKey.length !== KEY_BYTES) {
    throw new RangeError('data key must be a 32-byte Buffer');
  }
}

function fail(code: ConstructorParameters<typeof KeyProviderError>[0], message: string): never {
  throw new KeyProviderError(code, message);
}

function headerAad(f: Pick<KeyringFile, 'format' | 'version' | 'kdf'>): Buffer {
  // Rebuilt field by field in a fixed order, so the bytes do not depend on how the file was laid out.
  const { alg, N, r, p, salt } = f.kdf;
  return Buffer.from(JSON.stringify({ format: f.format, version: f.version, kdf: { alg, N, r, p, salt } }));
}

function deriveMasterKey(passphrase: Buffer, kdf: KdfHeader): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    scrypt(
      passphrase,
      Buffer.from(kdf.salt, 'base64'),
      KEY_BYTES,
      { N: kdf.N, r: kdf.r, p: kdf.p, maxmem: 256 * kdf.N * kdf.r + 1024 * 1024 },
      (err, key) => (err ? reject(err) : resolve(key)),
    );
  });
}

function passphraseBytes(passphrase: string | Buffer): Buffer {
  const b = typeof passphrase === 'string' ? Buffer.from(passphrase.normalize('NFC'), 'utf8') : passphrase;
  if (!Buffer.isBuffer(b) || b.length === 0) fail('misconfigured', 'keyring passphrase is empty');
  return b;
}

/** Parses and bounds-checks a keyring file's header; never derives anything. */
function parseKeyringFile(text: string): KeyringFile {
  let f: unknown;
  try {
    f = JSON.parse(text);
  } catch {
    fail('misconfigured', 'keyring file is not a Custos keyring (not JSON)');
  }
  const o = f as Partial<KeyringFile> | null;
  if (!o || typeof o !== 'object' || o.format !== FORMAT) {
    fail('misconfigured', 'keyring file is not a Custos keyring');
  }
  if (o.version !== VERSION) fail('misconfigured', 'keyring file version is not supported');
  const kdf = o.kdf;
  const seal = o.seal;
  const log2n = kdf && Number.isInteger(kdf.N) ? Math.log2(kdf.N) : NaN;
  if (
    !kdf ||
    kdf.alg !== 'scrypt' ||
    !Number.isInteger(log2n) ||
    log2n < MIN_LOG2N ||
    log2n > MAX_LOG2N ||
    kdf.r !== SCRYPT_R ||
    kdf.p !== SCRYPT_P ||
    typeof kdf.salt !== 'string' ||
    Buffer.from(kdf.salt, 'base64').length < 16
  ) {
    fail('misconfigured', 'keyring file has unsupported key-derivation parameters');
  }
  if (
    !seal ||
    seal.alg !== 'A256GCM' ||
    typeof seal.nonce !== 'string' ||
    typeof seal.ciphertext !== 'string' ||
    Buffer.from(seal.nonce, 'base64').length !== NONCE_BYTES
  ) {
    fail('misconfigured', 'keyring file has an unsupported seal');
  }
  return { format: o.format, version: o.version, kdf, seal };
}

interface Unsealed {
  keks: Map<string, KekEntry>;
  destroyed: Map<string, string>;
}

function unseal(file: KeyringFile, masterKey: Buffer): Unsealed {
  const ct = Buffer.from(file.seal.ciphertext, 'base64');
  let plain: Buffer;
  try {
    if (ct.length < TAG_BYTES) throw new Error('short');
    const d = createDecipheriv('aes-256-gcm', masterKey, Buffer.from(file.seal.nonce, 'base64'));
    d.setAAD(headerAad(file));
    d.setAuthTag(ct.subarray(ct.length - TAG_BYTES));
    plain = Buffer.concat([d.update(ct.subarray(0, ct.length - TAG_BYTES)), d.final()]);
  } catch {
    // GCM cannot tell a wrong passphrase from a damaged file; both mean "this passphrase does not open it".
    fail('bad_passphrase', 'keyring could not be opened: wrong passphrase, or the file was altered');
  }
  let body: Body;
  try {
    body = JSON.parse(plain.toString('utf8')) as Body;
  } catch {
    fail('misconfigured', 'keyring body is malformed');
  } finally {
    plain.fill(0);
  }
  const out: Unsealed = { keks: new Map(), destroyed: new Map() };
  for (const e of body.keks ?? []) {
    const kek = Buffer.from(e.kek, 'base64');
    if (kek.length !== KEY_BYTES) fail('misconfigured', 'keyring body is malformed');
    out.keks.set(e.handle, { keyId: e.keyId, kek, created: e.created });
  }
  for (const t of body.destroyed ?? []) out.destroyed.set(t.handle, t.destroyedAt);
  return out;
}

/**
 * Writes `data` to `target` atomically with mode 0600. With `noClobber` the final step is link(2)
 * instead of rename(2), so an existing file is never replaced (EEXIST → `misconfigured`).
 */
async function writeAtomically(target: string, data: string, noClobber = false): Promise<void> {
  const dir = path.dirname(target);
  const tmp = path.join(
    dir,
    `.${path.basename(target)}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`,
  );
  let fh: fs.FileHandle | undefined;
  try {
    fh = await fs.open(tmp, 'wx', 0o600);
    await fh.chmod(0o600); // whatever the umask
    await fh.writeFile(data, 'utf8');
    await fh.sync();
    await fh.close();
    fh = undefined;
    if (noClobber) {
      await fs.link(tmp, target);
      await fs.rm(tmp);
    } else {
      await fs.rename(tmp, target);
    }
  } catch (e) {
    await fh?.close().catch(() => {});
    await fs.rm(tmp, { force: true }).catch(() => {});
    if ((e as { code?: unknown }).code === 'EEXIST')
      fail('misconfigured', 'refusing to overwrite an existing file');
    throw e;
  }
  // Make the rename itself durable.
  const dh = await fs.open(dir, 'r');
  try {
    await dh.sync();
  } finally {
    await dh.close();
  }
}

/**
 * A keyring file of KEKs, sealed under a passphrase (see the module comment for the format).
 * Obtain one with {@link openLocalKeyring}; the constructor is private because opening derives the
 * master key asynchronously.
 */
export class LocalKeyring implements KeyProvider {
  readonly kind = 'local' as const;
  #keks: Map<string, KekEntry>;
  #destroyed: Map<string, string>;
  #kdf: KdfHeader;
  #masterKey: Buffer;
  #closed = false;
  /** Serialises rewrites of the file. */
  #writing: Promise<unknown> = Promise.resolve();
  /** The file's identity (inode, size, mtime) as last read or written: a change means another process wrote it. */
  #seen: string | undefined;

  private constructor(
    /** The keyring file's path. */
    readonly path: string,
    kdf: KdfHeader,
    masterKey: Buffer,
    keks: Map<string, KekEntry>,
    destroyed: Map<string, string>,
  ) {
    this.#kdf = kdf;
    this.#masterKey = masterKey;
    this.#keks = keks;
    this.#destroyed = destroyed;
  }

  /** See {@link openLocalKeyring}. */
  static async open(
    file: string,
    passphrase: string | Buffer,
    opts: LocalKeyringOptions = {},
  ): Promise<LocalKeyring> {
    const pass = passphraseBytes(passphrase);
    const target = path.resolve(file);
    let text: string | undefined;
    try {
      const st = await fs.stat(target);
      if (!st.isFile()) fail('misconfigured', 'keyring path is not a regular file');
      if (process.platform !== 'win32' && (st.mode & 0o077) !== 0) {
        fail('misconfigured', 'keyring file is readable by group or others: chmod 600 it');
      }
      text = await fs.readFile(target, 'utf8');
    } catch (e) {
      if (e instanceof KeyProviderError) throw e;
      if ((e as { code?: unknown }).code !== 'ENOENT') fail('unavailable', 'keyring file could not be read');
    }
    if (text === undefined) {
      if (!opts.create) fail('misconfigured', 'keyring file does not exist');
      return LocalKeyring.#create(target, pass, opts.scryptLog2N ?? DEFAULT_SCRYPT_LOG2N);
    }
    return LocalKeyring.#fromText(target, text, pass);
  }

  static async #fromText(target: string, text: string, pass: Buffer): Promise<LocalKeyring> {
    const parsed = parseKeyringFile(text);
    const masterKey = await deriveMasterKey(pass, parsed.kdf);
    try {
      const { keks, destroyed } = unseal(parsed, masterKey);
      return new LocalKeyring(target, parsed.kdf, masterKey, keks, destroyed);
    } catch (e) {
      masterKey.fill(0);
      throw e;
    }
  }

  /** See {@link importLocalKeyringEscrow}. */
  static async importEscrow(
    escrowPath: string,
    keyringPath: string,
    passphrase: string | Buffer,
  ): Promise<LocalKeyring> {
    const pass = passphraseBytes(passphrase);
    let text: string;
    try {
      text = await fs.readFile(path.resolve(escrowPath), 'utf8');
    } catch {
      fail('misconfigured', 'escrow file could not be read');
    }
    const target = path.resolve(keyringPath);
    if (await exists(target)) fail('misconfigured', 'a keyring already exists at the restore path');
    // Opening it in memory first proves the passphrase and the seal before anything is written.
    const keyring = await LocalKeyring.#fromText(target, text, pass);
    try {
      await fs.mkdir(path.dirname(target), { recursive: true, mode: 0o700 });
      await writeAtomically(target, text, true);
    } catch (e) {
      await keyring.close();
      if (e instanceof KeyProviderError) throw e;
      fail('unavailable', 'keyring file could not be written');
    }
    return keyring;
  }

  static async #create(target: string, pass: Buffer, log2n: number): Promise<LocalKeyring> {
    if (!Number.isInteger(log2n) || log2n < MIN_LOG2N || log2n > MAX_LOG2N) {
      throw new RangeError(`scryptLog2N must be an integer from ${MIN_LOG2N} to ${MAX_LOG2N}`);
    }
    const kdf: KdfHeader = {
      alg: 'scrypt',
      N: 2 ** log2n,
      r: SCRYPT_R,
      p: SCRYPT_P,
      salt: randomBytes(16).toString('base64'),
    };
    const masterKey = await deriveMasterKey(pass, kdf);
    const keyring = new LocalKeyring(target, kdf, masterKey, new Map(), new Map());
    try {
      await fs.mkdir(path.dirname(target), { recursive: true, mode: 0o700 });
      await writeAtomically(target, keyring.#serialise(), true);
    } catch (e) {
      await keyring.close();
      if (e instanceof KeyProviderError) throw e;
      fail('unavailable', 'keyring file could not be written');
    }
    return keyring;
  }

  async createKek(keyId: string): Promise<string> {
    this.#open();
    checkKeyId(keyId);
    const handle = `${keyId}#${randomBytes(8).toString('hex')}`;
    const entry: KekEntry = { keyId, kek: randomBytes(KEY_BYTES), created: new Date().toISOString() };
    await this.#mutate(
      () => this.#keks.set(handle, entry),
      () => this.#keks.delete(handle),
    );
    return handle;
  }

  async wrap(handle: string, dataKey: Buffer, aad: Buffer): Promise<Buffer> {
    await this.#refresh();
    const kek = this.#kek(handle);
    checkDataKey(dataKey);
    const nonce = randomBytes(NONCE_BYTES);
    const c = createCipheriv('aes-256-gcm', kek, nonce);
    c.setAAD(aad);
    const ct = Buffer.concat([c.update(dataKey), c.final()]);
    return Buffer.concat([Buffer.of(WRAP_VERSION), nonce, ct, c.getAuthTag()]);
  }

  async unwrap(handle: string, wrapped: Buffer, aad: Buffer): Promise<Buffer> {
    await this.#refresh();
    const kek = this.#kek(handle);
    if (wrapped.length !== WRAPPED_BYTES || wrapped[0] !== WRAP_VERSION) {
      fail('integrity', 'wrapped key is malformed');
    }
    try {
      const d = createDecipheriv('aes-256-gcm', kek, wrapped.subarray(1, 1 + NONCE_BYTES));
      d.setAAD(aad);
      d.setAuthTag(wrapped.subarray(WRAPPED_BYTES - TAG_BYTES));
      return Buffer.concat([
        d.update(wrapped.subarray(1 + NONCE_BYTES, WRAPPED_BYTES - TAG_BYTES)),
        d.final(),
      ]);
    } catch {
      fail('integrity', 'wrapped key failed authentication (wrong KEK, altered blob or different AAD)');
    }
  }

  async destroyKek(handle: string): Promise<void> {
    this.#open();
    await this.#refresh();
    if (this.#destroyed.has(handle)) return;
    const entry = this.#keks.get(handle);
    if (!entry) fail('unknown_key', 'no KEK with this handle in the keyring');
    await this.#mutate(
      () => {
        this.#keks.delete(handle);
        this.#destroyed.set(handle, new Date().toISOString());
      },
      () => {
        this.#destroyed.delete(handle);
        this.#keks.set(handle, entry);
      },
    );
    entry.kek.fill(0);
  }

  /**
   * Re-seals the keyring under a new passphrase (new salt, current scrypt cost). Copies of the file
   * made before stay sealed under the old passphrase.
   */
  async changePassphrase(newPassphrase: string | Buffer): Promise<void> {
    this.#open();
    const pass = passphraseBytes(newPassphrase);
    const kdf: KdfHeader = { ...this.#kdf, salt: randomBytes(16).toString('base64') };
    const masterKey = await deriveMasterKey(pass, kdf);
    const [oldKdf, oldKey] = [this.#kdf, this.#masterKey];
    await this.#mutate(
      () => {
        this.#kdf = kdf;
        this.#masterKey = masterKey;
      },
      () => {
        this.#kdf = oldKdf;
        this.#masterKey = oldKey;
      },
    );
    oldKey.fill(0);
  }

  /**
   * Writes an escrow copy of the keyring to `escrowPath` (mode 0600, atomically; refuses to
   * overwrite). The copy is a complete keyring file under the same passphrase: restoring it is
   * {@link importLocalKeyringEscrow}. Returns the SHA-256 of the copy, for the escrow record.
   */
  async exportEscrow(escrowPath: string): Promise<{ sha256: string }> {
    this.#open();
    const target = path.resolve(escrowPath);
    if (await exists(target)) fail('misconfigured', 'escrow file already exists');
    const text = await this.#serialised(async () => {
      const t = this.#serialise();
      try {
        await writeAtomically(target, t, true);
      } catch (e) {
        if (e instanceof KeyProviderError) throw e;
        fail('unavailable', 'escrow file could not be written');
      }
      return t;
    });
    return { sha256: createHash('sha256').update(text).digest('hex') };
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    await this.#writing.catch(() => {});
    this.#closed = true;
    for (const e of this.#keks.values()) e.kek.fill(0);
    this.#keks.clear();
    this.#masterKey.fill(0);
  }

  #open(): void {
    if (this.#closed) fail('unavailable', 'key provider is closed');
  }

  #kek(handle: string): Buffer {
    this.#open();
    const e = this.#keks.get(handle);
    if (e) return e.kek;
    if (this.#destroyed.has(handle)) fail('destroyed', 'the KEK was destroyed');
    fail('unknown_key', 'no KEK with this handle in the keyring');
  }

  #serialise(): string {
    const body: Body = {
      keks: [...this.#keks].map(([handle, e]) => ({
        handle,
        keyId: e.keyId,
        kek: e.kek.toString('base64'),
        created: e.created,
      })),
      destroyed: [...this.#destroyed].map(([handle, destroyedAt]) => ({ handle, destroyedAt })),
    };
    const plain = Buffer.from(JSON.stringify(body), 'utf8');
    const head = { format: FORMAT, version: VERSION, kdf: this.#kdf };
    const nonce = randomBytes(NONCE_BYTES);
    const c = createCipheriv('aes-256-gcm', this.#masterKey, nonce);
    c.setAAD(headerAad(head));
    const ct = Buffer.concat([c.update(plain), c.final(), c.getAuthTag()]);
    plain.fill(0);
    const file: KeyringFile = {
      ...head,
      seal: { alg: 'A256GCM', nonce: nonce.toString('base64'), ciphertext: ct.toString('base64') },
    };
    return `${JSON.stringify(file, null, 2)}\n`;
  }

  #serialised<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#writing.then(fn, fn);
    this.#writing = run.catch(() => {});
    return run;
  }

  #persist(): Promise<void> {
    return writeAtomically(this.path, this.#serialise());
  }

  /**
   * Applies a change in memory, rewrites the file, and undoes the change if the write fails. Under
   * the lock file, the file is first re-read and merged, so a change another process made meanwhile
   * is kept.
   */
  async #mutate(apply: () => void, undo: () => void): Promise<void> {
    await this.#serialised(async () => {
      this.#open();
      const release = await lockFile(`${this.path}.lock`);
      try {
        await this.#refresh();
        apply();
        try {
          await this.#persist();
          this.#seen = await fileIdentity(this.path);
        } catch {
          undo();
          fail('unavailable', 'keyring file could not be written');
        }
      } finally {
        await release();
      }
    });
  }

  /**
   * Merges what another process wrote to the file since this one last read or wrote it: KEKs it
   * created, and tombstones of KEKs it destroyed (their keys are dropped here too). Nothing is
   * read when the file is unchanged. A file this process cannot open (another passphrase, damage)
   * is ignored here: the next write, or a restart, reports it.
   */
  async #refresh(): Promise<void> {
    const id = await fileIdentity(this.path).catch(() => undefined);
    if (id === undefined || id === this.#seen) return;
    let other: Unsealed;
    try {
      const parsed = parseKeyringFile(await fs.readFile(this.path, 'utf8'));
      if (parsed.kdf.salt !== this.#kdf.salt) return;
      other = unseal(parsed, this.#masterKey);
    } catch {
      return;
    }
    for (const [handle, entry] of other.keks) {
      if (!this.#keks.has(handle) && !this.#destroyed.has(handle)) this.#keks.set(handle, entry);
      else entry.kek.fill(0);
    }
    for (const [handle, at] of other.destroyed) {
      // Dropped, not zeroed: an operation in flight on this thread has already copied what it needs.
      this.#keks.delete(handle);
      this.#destroyed.set(handle, at);
    }
    this.#seen = id;
  }
}

async function fileIdentity(p: string): Promise<string> {
  const st = await fs.stat(p, { bigint: true });
  return `${st.ino}:${st.size}:${st.mtimeNs}`;
}

/**
 * An exclusive lock between processes: a lock file created with O_EXCL, removed on release. A lock
 * older than 30 s is taken to be left by a crashed process and broken (a keyring write takes
 * milliseconds).
 */
async function lockFile(lock: string): Promise<() => Promise<void>> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      const fh = await fs.open(lock, 'wx', 0o600);
      await fh.close();
      return () => fs.rm(lock, { force: true });
    } catch (e) {
      if ((e as { code?: unknown }).code !== 'EEXIST')
        fail('unavailable', 'keyring lock file could not be created');
      const st = await fs.stat(lock).catch(() => undefined);
      if (st && Date.now() - st.mtimeMs > 30_000) await fs.rm(lock, { force: true });
      else if (Date.now() > deadline) fail('unavailable', 'keyring is locked by another process');
      else await new Promise((r) => setTimeout(r, 20));
    }
  }
}

async function exists(p: string): Promise<boolean> {
  try {
    await fs.lstat(p);
    return true;
  } catch {
    return false;
  }
}

/**
 * Opens the keyring file at `file` with `passphrase`. A missing file is an error unless
 * `opts.create`; a wrong passphrase fails with `bad_passphrase`; a file readable by group or
 * others, or one that is not a version-1 Custos keyring, with `misconfigured`.
 */
export async function openLocalKeyring(
  file: string,
  passphrase: string | Buffer,
  opts: LocalKeyringOptions = {},
): Promise<LocalKeyring> {
  return LocalKeyring.open(file, passphrase, opts);
}

/**
 * Restores an escrow copy (made by {@link LocalKeyring.exportEscrow}, or any copy of a keyring
 * file) to `keyringPath`: checks that `passphrase` opens it first, refuses to overwrite an
 * existing keyring, writes it with mode 0600, and returns it opened.
 */
export async function importLocalKeyringEscrow(
  escrowPath: string,
  keyringPath: string,
  passphrase: string | Buffer,
): Promise<LocalKeyring> {
  return LocalKeyring.importEscrow(escrowPath, keyringPath, passphrase);
}
