import { randomBytes } from 'node:crypto';
import { createRequire } from 'node:module';
import path from 'node:path';
import type * as Pkcs11Js from 'pkcs11js';
import { KeyProviderError, type KeyProvider, type KeyProviderErrorCode } from './key-provider.ts';

/**
 * The `pkcs11` key provider: KEKs are AES-256 secret-key objects generated inside a PKCS#11 token
 * (an HSM; SoftHSMv2 in tests) as sensitive and non-extractable, labelled with their handle. The
 * KEK never leaves the token.
 *
 * wrap = CKM_AES_GCM encryption of the 32-byte data key inside the token, with a fresh random
 * 96-bit IV and `aad` as the GCM additional authenticated data (128-bit tag); the wrapped blob is
 * `0x01 ‖ IV (12) ‖ ciphertext (32) ‖ tag (16)`. unwrap = CKM_AES_GCM decryption inside the token,
 * which fails unless the KEK, the blob and the AAD are all the ones used to wrap; the data key
 * comes back to Node, where envelope encryption happens. GCM (rather than CKM_AES_KEY_WRAP_PAD,
 * which has no AAD input) is what binds the AAD. The KEK's CKA_WRAP/CKA_UNWRAP are false: the
 * token will not export other keys under it.
 *
 * Calls into the module are synchronous (pkcs11js's sync API): each operation blocks the event loop
 * for one token round trip (about 40 µs with SoftHSM), and keeps C_EncryptInit/C_Encrypt pairs on
 * the one session from interleaving. A network HSM would want a session pool and the async API.
 *
 * Error messages are fixed text, at most naming the PKCS#11 return value (`CKR_…`).
 *
 * @example
 * ```ts
 * const hsm = await openPkcs11Provider({
 *   module: '/usr/lib/softhsm/libsofthsm2.so', tokenLabel: 'custos', pin: process.env.CUSTOS_PKCS11_PIN!,
 * });
 * const handle = await hsm.createKek('project-a.epoch-1');
 * ```
 */
export interface Pkcs11ProviderOptions {
  /** Absolute path of the PKCS#11 module (shared library), e.g. `/usr/lib/softhsm/libsofthsm2.so`. Loading it runs its code: it must be trusted and root-owned. */
  module: string;
  /** CKA label of the token (CK_TOKEN_INFO.label, without the space padding). */
  tokenLabel: string;
  /** The user (CKU_USER) PIN. Used to log in when opening, not kept. */
  pin: string;
}

/** What the token says about a KEK object, for evidence that KEKs cannot leave it. */
export interface Pkcs11KekAttributes {
  sensitive: boolean;
  extractable: boolean;
  alwaysSensitive: boolean;
  neverExtractable: boolean;
  valueLen: number;
}

type Pkcs11Module = typeof Pkcs11Js;
type Handle = Buffer;

const WRAP_VERSION = 0x01;
const IV_BYTES = 12;
const TAG_BYTES = 16;
const KEY_BYTES = 32;
const WRAPPED_BYTES = 1 + IV_BYTES + KEY_BYTES + TAG_BYTES;
/** CK_STATE values (PKCS#11 2.40 section 5.6); pkcs11js does not export them. */
const CKS_RW_USER_FUNCTIONS = 3;

const KEY_ID = /^[A-Za-z0-9._:/-]{1,128}$/;
const HANDLE = /^[A-Za-z0-9._:/-]{1,128}#[0-9a-f]{16}$/;

function fail(code: KeyProviderErrorCode, message: string): never {
  throw new KeyProviderError(code, message);
}

/** The CKR_ name of a pkcs11js error, or 'unknown' (its message is only ever that name). */
function ckrName(e: unknown): string {
  const m = e instanceof Error ? e.message : '';
  return /^CKR_[A-Z0-9_]{1,60}$/.test(m) ? m : 'unknown';
}

const CKR_CODES: Record<string, KeyProviderErrorCode> = {
  CKR_USER_NOT_LOGGED_IN: 'unavailable',
  CKR_DEVICE_REMOVED: 'unavailable',
  CKR_DEVICE_ERROR: 'unavailable',
  CKR_DEVICE_MEMORY: 'unavailable',
  CKR_TOKEN_NOT_PRESENT: 'unavailable',
  CKR_SESSION_CLOSED: 'unavailable',
  CKR_SESSION_HANDLE_INVALID: 'unavailable',
  CKR_CRYPTOKI_NOT_INITIALIZED: 'unavailable',
  CKR_OBJECT_HANDLE_INVALID: 'unknown_key',
  CKR_KEY_HANDLE_INVALID: 'unknown_key',
  CKR_MECHANISM_INVALID: 'misconfigured',
  CKR_MECHANISM_PARAM_INVALID: 'misconfigured',
  CKR_KEY_FUNCTION_NOT_PERMITTED: 'misconfigured',
  CKR_KEY_TYPE_INCONSISTENT: 'misconfigured',
  CKR_TEMPLATE_INCONSISTENT: 'misconfigured',
  CKR_ATTRIBUTE_VALUE_INVALID: 'misconfigured',
  CKR_TOKEN_WRITE_PROTECTED: 'misconfigured',
  CKR_SESSION_READ_ONLY: 'misconfigured',
  CKR_PIN_INCORRECT: 'misconfigured',
  CKR_PIN_LOCKED: 'misconfigured',
  CKR_PIN_EXPIRED: 'misconfigured',
  CKR_PIN_INVALID: 'misconfigured',
  CKR_PIN_LEN_RANGE: 'misconfigured',
  CKR_USER_PIN_NOT_INITIALIZED: 'misconfigured',
  CKR_USER_ANOTHER_ALREADY_LOGGED_IN: 'misconfigured',
};

/**
 * What a failed GCM decryption looks like: the standard says CKR_ENCRYPTED_DATA_INVALID (2.40) or
 * CKR_AEAD_DECRYPT_FAILED (3.0); SoftHSMv2 2.6 answers CKR_GENERAL_ERROR.
 */
const DECRYPT_AUTH_FAILURES = new Set([
  'CKR_ENCRYPTED_DATA_INVALID',
  'CKR_ENCRYPTED_DATA_LEN_RANGE',
  'CKR_AEAD_DECRYPT_FAILED',
  'CKR_GENERAL_ERROR',
  'unknown',
]);

function mapError(op: string, e: unknown): KeyProviderError {
  if (e instanceof KeyProviderError) return e;
  const name = ckrName(e);
  return new KeyProviderError(CKR_CODES[name] ?? 'unavailable', `PKCS#11 ${op} failed (${name})`);
}

let binding: Pkcs11Module | undefined;

function loadBinding(): Pkcs11Module {
  if (!binding) {
    try {
      // Loaded on first use, so deployments with another provider never load the native addon.
      binding = createRequire(import.meta.url)('pkcs11js') as Pkcs11Module;
    } catch {
      fail('misconfigured', 'the pkcs11js native binding is not installed or not built');
    }
  }
  return binding;
}

/**
 * A module is loaded and C_Initialize'd once per process and shared by every provider on it
 * (C_Initialize twice fails; C_Finalize would end the other providers' sessions).
 */
interface SharedModule {
  lib: Pkcs11Js.PKCS11;
  refs: number;
  /** False when something else in the process had initialised it: then we never finalise it. */
  ownsInit: boolean;
}
const modules = new Map<string, SharedModule>();

function acquireModule(p: Pkcs11Module, modulePath: string): SharedModule {
  const existing = modules.get(modulePath);
  if (existing) {
    existing.refs++;
    return existing;
  }
  const lib = new p.PKCS11();
  try {
    lib.load(modulePath);
  } catch {
    // The loader's message names the path and the OS error; ours stays fixed.
    fail('misconfigured', 'the PKCS#11 module could not be loaded (check its path)');
  }
  let ownsInit = true;
  try {
    lib.C_Initialize();
  } catch (e) {
    if (ckrName(e) !== 'CKR_CRYPTOKI_ALREADY_INITIALIZED') {
      lib.close();
      throw mapError('C_Initialize', e);
    }
    ownsInit = false;
  }
  const m: SharedModule = { lib, refs: 1, ownsInit };
  modules.set(modulePath, m);
  return m;
}

function releaseModule(modulePath: string): void {
  const m = modules.get(modulePath);
  if (!m || --m.refs > 0) return;
  modules.delete(modulePath);
  try {
    if (m.ownsInit) m.lib.C_Finalize();
    m.lib.close();
  } catch {
    // Nothing useful to do while shutting down.
  }
}

function tokenLabelOf(info: { label: string }): string {
  return info.label.replace(/[\s\0]+$/, '');
}

/** A KeyProvider backed by one logged-in read/write session on a PKCS#11 token. */
export class Pkcs11Provider implements KeyProvider {
  readonly kind = 'pkcs11' as const;
  readonly #p: Pkcs11Module;
  readonly #m: SharedModule;
  readonly #modulePath: string;
  readonly #session: Handle;
  #closed = false;

  private constructor(p: Pkcs11Module, m: SharedModule, modulePath: string, session: Handle) {
    this.#p = p;
    this.#m = m;
    this.#modulePath = modulePath;
    this.#session = session;
  }

  /** See {@link openPkcs11Provider}. */
  static async open(opts: Pkcs11ProviderOptions): Promise<Pkcs11Provider> {
    if (typeof opts.module !== 'string' || !path.isAbsolute(opts.module)) {
      fail('misconfigured', 'PKCS#11 module path must be an absolute path');
    }
    if (typeof opts.tokenLabel !== 'string' || opts.tokenLabel.length < 1 || opts.tokenLabel.length > 32) {
      fail('misconfigured', 'PKCS#11 token label must be 1–32 characters');
    }
    if (typeof opts.pin !== 'string' || opts.pin.length === 0) fail('misconfigured', 'PKCS#11 PIN is empty');
    const p = loadBinding();
    const modulePath = path.resolve(opts.module);
    const m = acquireModule(p, modulePath);
    let session: Handle | undefined;
    try {
      const lib = m.lib;
      const slot = Pkcs11Provider.#findSlot(p, lib, opts.tokenLabel);
      let mechanisms: number[];
      try {
        mechanisms = lib.C_GetMechanismList(slot);
      } catch (e) {
        throw mapError('C_GetMechanismList', e);
      }
      for (const [mech, name] of [
        [p.CKM_AES_KEY_GEN, 'CKM_AES_KEY_GEN'],
        [p.CKM_AES_GCM, 'CKM_AES_GCM'],
      ] as const) {
        if (!mechanisms.includes(mech)) fail('misconfigured', `the PKCS#11 token does not support ${name}`);
      }
      try {
        session = lib.C_OpenSession(slot, p.CKF_RW_SESSION | p.CKF_SERIAL_SESSION);
      } catch (e) {
        throw mapError('C_OpenSession', e);
      }
      try {
        lib.C_Login(session, p.CKU_USER, opts.pin);
      } catch (e) {
        const name = ckrName(e);
        // Login state is per application and token: another provider in this process logged in.
        if (name !== 'CKR_USER_ALREADY_LOGGED_IN') {
          throw new KeyProviderError(CKR_CODES[name] ?? 'unavailable', `PKCS#11 login failed (${name})`);
        }
      }
      return new Pkcs11Provider(p, m, modulePath, session);
    } catch (e) {
      if (session) {
        try {
          m.lib.C_CloseSession(session);
        } catch {
          // already failing
        }
      }
      releaseModule(modulePath);
      throw e;
    }
  }

  static #findSlot(p: Pkcs11Module, lib: Pkcs11Js.PKCS11, label: string): Handle {
    let slots: Handle[];
    try {
      slots = lib.C_GetSlotList(true);
    } catch (e) {
      throw mapError('C_GetSlotList', e);
    }
    const matches = slots.filter((slot) => {
      try {
        const info = lib.C_GetTokenInfo(slot);
        return (info.flags & p.CKF_TOKEN_INITIALIZED) !== 0 && tokenLabelOf(info) === label;
      } catch {
        return false; // a slot whose token went away meanwhile
      }
    });
    if (matches.length === 0) fail('misconfigured', 'no initialised PKCS#11 token has the configured label');
    if (matches.length > 1) fail('misconfigured', 'more than one PKCS#11 token has the configured label');
    return matches[0]!;
  }

  async createKek(keyId: string): Promise<string> {
    this.#ready();
    if (!KEY_ID.test(keyId)) throw new RangeError('keyId must be 1–128 characters of [A-Za-z0-9._:/-]');
    const p = this.#p;
    const handle = `${keyId}#${randomBytes(8).toString('hex')}`;
    try {
      this.#m.lib.C_GenerateKey(this.#session, { mechanism: p.CKM_AES_KEY_GEN }, [
        { type: p.CKA_CLASS, value: p.CKO_SECRET_KEY },
        { type: p.CKA_KEY_TYPE, value: p.CKK_AES },
        { type: p.CKA_VALUE_LEN, value: KEY_BYTES },
        { type: p.CKA_LABEL, value: handle },
        { type: p.CKA_TOKEN, value: true },
        { type: p.CKA_PRIVATE, value: true },
        { type: p.CKA_SENSITIVE, value: true },
        { type: p.CKA_EXTRACTABLE, value: false },
        { type: p.CKA_MODIFIABLE, value: false },
        { type: p.CKA_ENCRYPT, value: true },
        { type: p.CKA_DECRYPT, value: true },
        { type: p.CKA_WRAP, value: false },
        { type: p.CKA_UNWRAP, value: false },
        { type: p.CKA_SIGN, value: false },
        { type: p.CKA_VERIFY, value: false },
        { type: p.CKA_DERIVE, value: false },
      ]);
    } catch (e) {
      throw mapError('C_GenerateKey', e);
    }
    return handle;
  }

  async wrap(handle: string, dataKey: Buffer, aad: Buffer): Promise<Buffer> {
    if (!Buffer.isBuffer(dataKey) || dataKey.length !== KEY_BYTES) {
      throw new RangeError('data key must be a 32-byte Buffer');
    }
    const key = this.#kek(handle);
    const iv = randomBytes(IV_BYTES);
    const lib = this.#m.lib;
    try {
      lib.C_EncryptInit(this.#session, this.#gcm(iv, aad), key);
      const out = lib.C_Encrypt(this.#session, dataKey, Buffer.alloc(KEY_BYTES + TAG_BYTES));
      if (out.length !== KEY_BYTES + TAG_BYTES)
        fail('misconfigured', 'PKCS#11 GCM output has the wrong length');
      return Buffer.concat([Buffer.of(WRAP_VERSION), iv, out]);
    } catch (e) {
      throw mapError('C_Encrypt', e);
    }
  }

  async unwrap(handle: string, wrapped: Buffer, aad: Buffer): Promise<Buffer> {
    const key = this.#kek(handle);
    if (wrapped.length !== WRAPPED_BYTES || wrapped[0] !== WRAP_VERSION) {
      fail('integrity', 'wrapped key is malformed');
    }
    const lib = this.#m.lib;
    const iv = wrapped.subarray(1, 1 + IV_BYTES);
    const out = Buffer.alloc(KEY_BYTES + TAG_BYTES);
    try {
      lib.C_DecryptInit(this.#session, this.#gcm(iv, aad), key);
    } catch (e) {
      throw mapError('C_DecryptInit', e);
    }
    try {
      const plain = lib.C_Decrypt(this.#session, wrapped.subarray(1 + IV_BYTES), out);
      if (plain.length !== KEY_BYTES) fail('integrity', 'unwrapped key has the wrong length');
      return Buffer.from(plain);
    } catch (e) {
      if (e instanceof KeyProviderError) throw e;
      const name = ckrName(e);
      if (DECRYPT_AUTH_FAILURES.has(name)) {
        fail('integrity', 'wrapped key failed authentication (wrong KEK, altered blob or different AAD)');
      }
      throw mapError('C_Decrypt', e);
    } finally {
      out.fill(0);
    }
  }

  /** C_DestroyObject on the KEK; the token forgets it at once (its backups may not: docs/keys.md). */
  async destroyKek(handle: string): Promise<void> {
    this.#ready();
    const objects = this.#find(handle);
    if (objects.length === 0) fail('unknown_key', 'no KEK with this handle on the token');
    for (const o of objects) {
      try {
        this.#m.lib.C_DestroyObject(this.#session, o);
      } catch (e) {
        throw mapError('C_DestroyObject', e);
      }
    }
  }

  /** The KEK's protection attributes as the token reports them (CKA_VALUE itself is never readable). */
  async describeKek(handle: string): Promise<Pkcs11KekAttributes> {
    const key = this.#kek(handle);
    const p = this.#p;
    try {
      const attrs = this.#m.lib.C_GetAttributeValue(this.#session, key, [
        { type: p.CKA_SENSITIVE },
        { type: p.CKA_EXTRACTABLE },
        { type: p.CKA_ALWAYS_SENSITIVE },
        { type: p.CKA_NEVER_EXTRACTABLE },
        { type: p.CKA_VALUE_LEN },
      ]);
      const bool = (i: number) => (attrs[i]?.value[0] ?? 0) !== 0;
      const len = attrs[4]?.value;
      return {
        sensitive: bool(0),
        extractable: bool(1),
        alwaysSensitive: bool(2),
        neverExtractable: bool(3),
        valueLen: len ? len.readUIntLE(0, Math.min(len.length, 6)) : 0,
      };
    } catch (e) {
      throw mapError('C_GetAttributeValue', e);
    }
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.#m.lib.C_CloseSession(this.#session);
    } catch {
      // The session may already be gone with the token.
    }
    releaseModule(this.#modulePath);
  }

  #gcm(iv: Buffer, aad: Buffer): Pkcs11Js.Mechanism {
    const p = this.#p;
    // CK_GCM_PARAMS as in PKCS#11 2.40/3.0 (with ulIvBits); checked against node:crypto in the tests.
    return {
      mechanism: p.CKM_AES_GCM,
      parameter: { type: p.CK_PARAMS_AES_GCM_v240, iv, ivBits: IV_BYTES * 8, aad, tagBits: TAG_BYTES * 8 },
    } as Pkcs11Js.Mechanism;
  }

  /** Fails clearly when the session lost its login (private objects would look absent otherwise). */
  #ready(): void {
    if (this.#closed) fail('unavailable', 'key provider is closed');
    let state: number;
    try {
      state = this.#m.lib.C_GetSessionInfo(this.#session).state;
    } catch (e) {
      throw mapError('C_GetSessionInfo', e);
    }
    if (state !== CKS_RW_USER_FUNCTIONS) {
      fail('unavailable', 'the PKCS#11 session is not logged in to the token (reopen the provider)');
    }
  }

  #find(handle: string): Handle[] {
    if (!HANDLE.test(handle)) return [];
    const p = this.#p;
    const lib = this.#m.lib;
    try {
      lib.C_FindObjectsInit(this.#session, [
        { type: p.CKA_CLASS, value: p.CKO_SECRET_KEY },
        { type: p.CKA_KEY_TYPE, value: p.CKK_AES },
        { type: p.CKA_LABEL, value: handle },
      ]);
      try {
        return lib.C_FindObjects(this.#session, 2);
      } finally {
        lib.C_FindObjectsFinal(this.#session);
      }
    } catch (e) {
      throw mapError('C_FindObjects', e);
    }
  }

  #kek(handle: string): Handle {
    this.#ready();
    const found = this.#find(handle);
    if (found.length === 0) fail('unknown_key', 'no KEK with this handle on the token');
    if (found.length > 1) fail('misconfigured', 'more than one KEK object on the token has this handle');
    return found[0]!;
  }
}

/**
 * Opens a logged-in session on the token labelled `tokenLabel` in the PKCS#11 module `module`.
 * Fails with `misconfigured` when the module cannot be loaded, no (or more than one) token has the
 * label, the token lacks CKM_AES_GCM, or the PIN is refused.
 */
export async function openPkcs11Provider(opts: Pkcs11ProviderOptions): Promise<Pkcs11Provider> {
  return Pkcs11Provider.open(opts);
}
