import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createCipheriv, randomBytes, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { inspect } from 'node:util';
import type * as Pkcs11Js from 'pkcs11js';
import { KeyProviderError, type KeyProvider, type KeyProviderErrorCode } from '../src/crypto/key-provider.ts';
import {
  importLocalKeyringEscrow,
  openLocalKeyring,
  type LocalKeyring,
} from '../src/crypto/local-keyring.ts';
import { openPkcs11Provider, type Pkcs11Provider } from '../src/crypto/pkcs11-provider.ts';
import { KMS_AAD_CONTEXT_KEY, openAwsKmsProvider } from '../src/crypto/aws-kms-provider.ts';
import type { LogFields, Logger } from '../src/log/logger.ts';
import { startKmsStub, type KmsStub } from './support/kms-stub.ts';
import { createSoftHsmToken, needsSoftHsm, removeSoftHsm, type SoftHsmToken } from './support/softhsm.ts';

// The three KeyProvider implementations, each against the real thing: node:crypto and a keyring
// file; SoftHSMv2 through PKCS#11; the AWS SDK v3 against a local KMS stub (test/support/kms-stub.ts).

const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-keys-'));
const PASSPHRASE = 'correct horse battery staple';
const softhsmSkip = needsSoftHsm();
// SoftHSM lists its slots at C_Initialize: make the one token this file uses before any provider opens.
const token: SoftHsmToken | undefined = softhsmSkip ? undefined : createSoftHsmToken();

after(() => {
  fs.rmSync(tmpRoot, { recursive: true, force: true });
  removeSoftHsm();
});

const aadFor = (project: string, epoch = 1) => Buffer.from(`project=${project};epoch=${epoch};purpose=phi`);

async function rejection(p: Promise<unknown>): Promise<KeyProviderError> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof KeyProviderError, `expected a KeyProviderError, got ${inspect(e)}`);
    return e;
  }
  assert.fail('expected a rejection');
}

async function rejects(p: Promise<unknown>, codes: KeyProviderErrorCode | KeyProviderErrorCode[]) {
  const e = await rejection(p);
  const allowed = Array.isArray(codes) ? codes : [codes];
  assert.ok(allowed.includes(e.code), `code ${e.code}, expected ${allowed.join(' or ')}: ${e.message}`);
  return e;
}

/** Every textual form of an error that could reach a log or a response. */
function renderings(e: Error): string {
  return [
    e.message,
    e.stack ?? '',
    String(e),
    inspect(e, { depth: 5, showHidden: true }),
    JSON.stringify(e),
  ].join('\n');
}

function assertNoKeyMaterial(errors: Error[], keys: Buffer[]) {
  assert.ok(errors.length > 0);
  for (const e of errors) {
    const text = renderings(e);
    for (const k of keys) {
      for (const form of [
        k.toString('hex'),
        k.toString('hex').toUpperCase(),
        k.toString('base64'),
        k.toString('base64url'),
        k.toString('latin1'),
      ]) {
        assert.ok(!text.includes(form), `an error renders key material: ${e.message}`);
      }
    }
  }
}

interface Subject {
  open(): Promise<KeyProvider>;
  /** A handle of the provider's shape that names no KEK. */
  unknownHandle: string;
  cleanup?(): Promise<void>;
}

/** The KeyProvider contract, run against each implementation. */
function contract(name: string, skip: false | string, subject: () => Promise<Subject>) {
  describe(`KeyProvider contract: ${name}`, { skip }, () => {
    let s: Subject;
    let kp: KeyProvider;
    const errors: Error[] = [];
    const dataKeys: Buffer[] = [];
    const collect = async (p: Promise<unknown>, codes: KeyProviderErrorCode | KeyProviderErrorCode[]) =>
      errors.push(await rejects(p, codes));
    const newDataKey = () => {
      const k = randomBytes(32);
      dataKeys.push(k);
      return k;
    };

    before(async () => {
      s = await subject();
      kp = await s.open();
    });
    after(async () => {
      await kp?.close();
      await s?.cleanup?.();
    });

    test('wrap then unwrap returns the data key; each wrap is fresh', async () => {
      const h = await kp.createKek('project-a.epoch-1');
      const dk = newDataKey();
      const aad = aadFor('a');
      const w1 = await kp.wrap(h, dk, aad);
      const w2 = await kp.wrap(h, dk, aad);
      assert.ok(!w1.equals(w2), 'two wraps of the same key differ (random nonce)');
      assert.ok(!w1.includes(dk), 'the wrapped blob does not contain the key');
      assert.deepEqual(await kp.unwrap(h, w1, aad), dk);
      assert.deepEqual(await kp.unwrap(h, w2, aad), dk);
    });

    test('unwrap with a different aad fails with integrity', async () => {
      const h = await kp.createKek('project-b.epoch-1');
      const dk = newDataKey();
      const w = await kp.wrap(h, dk, aadFor('b', 1));
      await collect(kp.unwrap(h, w, aadFor('b', 2)), 'integrity');
      await collect(kp.unwrap(h, w, aadFor('other', 1)), 'integrity');
      await collect(kp.unwrap(h, w, Buffer.concat([aadFor('b', 1), Buffer.of(0)])), 'integrity');
      assert.deepEqual(await kp.unwrap(h, w, aadFor('b', 1)), dk);
    });

    test('a flipped bit anywhere in the wrapped blob, or a truncated blob, fails with integrity', async () => {
      const h = await kp.createKek('project-c.epoch-1');
      const dk = newDataKey();
      const aad = aadFor('c');
      const w = await kp.wrap(h, dk, aad);
      for (let i = 0; i < w.length; i++) {
        const bad = Buffer.from(w);
        bad[i]! ^= 1 << (i % 8);
        await collect(kp.unwrap(h, bad, aad), 'integrity');
      }
      await collect(kp.unwrap(h, w.subarray(0, w.length - 1), aad), 'integrity');
      await collect(kp.unwrap(h, Buffer.concat([w, Buffer.of(0)]), aad), 'integrity');
    });

    test('an unknown handle fails with unknown_key', async () => {
      const h = await kp.createKek('project-d.epoch-1');
      const dk = newDataKey();
      const w = await kp.wrap(h, dk, aadFor('d'));
      await collect(kp.unwrap(s.unknownHandle, w, aadFor('d')), 'unknown_key');
      await collect(kp.wrap(s.unknownHandle, dk, aadFor('d')), 'unknown_key');
      await collect(kp.destroyKek(s.unknownHandle), 'unknown_key');
    });

    test('after destroyKek, unwrap (and wrap) fail', async () => {
      const h = await kp.createKek('project-e.epoch-1');
      const dk = newDataKey();
      const w = await kp.wrap(h, dk, aadFor('e'));
      await kp.destroyKek(h);
      await collect(kp.unwrap(h, w, aadFor('e')), ['destroyed', 'unknown_key']);
      await collect(kp.wrap(h, dk, aadFor('e')), ['destroyed', 'unknown_key']);
    });

    test('two KEKs are independent', async () => {
      const a = await kp.createKek('project-f.epoch-1');
      const b = await kp.createKek('project-f.epoch-1'); // same keyId: still a new KEK
      assert.notEqual(a, b);
      const dk = newDataKey();
      const aad = aadFor('f');
      const wa = await kp.wrap(a, dk, aad);
      const wb = await kp.wrap(b, dk, aad);
      await collect(kp.unwrap(b, wa, aad), 'integrity');
      await collect(kp.unwrap(a, wb, aad), 'integrity');
      await kp.destroyKek(a);
      assert.deepEqual(await kp.unwrap(b, wb, aad), dk, 'destroying one KEK leaves the other');
      await collect(kp.unwrap(a, wa, aad), ['destroyed', 'unknown_key']);
    });

    test('no error carries the data key (hex, base64, raw)', () => {
      assertNoKeyMaterial(errors, dataKeys);
    });

    test('a closed provider refuses work', async () => {
      const other = await s.open();
      const h = await other.createKek('project-g.epoch-1');
      await other.close();
      await rejects(other.wrap(h, randomBytes(32), aadFor('g')), 'unavailable');
    });
  });
}

// ---------------------------------------------------------------------------------------------
// local

contract('local', false, async () => {
  const dir = fs.mkdtempSync(path.join(tmpRoot, 'contract-'));
  const file = path.join(dir, 'keyring.json');
  let first = true;
  return {
    // The first open creates the keyring (scrypt N=2^17); later opens of the same file reopen it.
    open: async () => {
      const kr = await openLocalKeyring(file, PASSPHRASE, { create: first });
      first = false;
      return kr;
    },
    unknownHandle: 'project-z.epoch-1#0123456789abcdef',
  };
});

describe('local keyring', () => {
  let dir: string;
  let file: string;
  let kr: LocalKeyring;
  let handle: string;
  const dk = randomBytes(32);
  const aad = aadFor('local');
  let wrapped: Buffer;

  before(async () => {
    dir = fs.mkdtempSync(path.join(tmpRoot, 'local-'));
    file = path.join(dir, 'keys', 'keyring.json');
    kr = await openLocalKeyring(file, PASSPHRASE, { create: true });
    handle = await kr.createKek('project-l.epoch-1');
    wrapped = await kr.wrap(handle, dk, aad);
  });
  after(async () => kr?.close());

  test('the keyring file is mode 0600, versioned JSON with its scrypt parameters, no KEK in clear', async () => {
    const st = fs.statSync(file);
    assert.equal(st.mode & 0o777, 0o600);
    const f = JSON.parse(fs.readFileSync(file, 'utf8'));
    assert.equal(f.format, 'custos-local-keyring');
    assert.equal(f.version, 1);
    assert.deepEqual(
      { alg: f.kdf.alg, N: f.kdf.N, r: f.kdf.r, p: f.kdf.p },
      { alg: 'scrypt', N: 2 ** 17, r: 8, p: 1 },
    );
    assert.equal(f.seal.alg, 'A256GCM');
    assert.ok(!fs.readFileSync(file, 'utf8').includes(handle), 'even handles are sealed');
    // Rewrites keep the mode and leave no temp files behind.
    await kr.destroyKek(await kr.createKek('project-l.epoch-0'));
    assert.equal(fs.statSync(file).mode & 0o777, 0o600);
    assert.deepEqual(fs.readdirSync(path.dirname(file)), ['keyring.json']);
  });

  test('reopening with the passphrase finds the KEKs; a wrong passphrase fails with bad_passphrase', async () => {
    const e = await rejects(openLocalKeyring(file, 'wrong horse battery staple'), 'bad_passphrase');
    assert.ok(!e.message.includes('wrong horse'));
    const again = await openLocalKeyring(file, PASSPHRASE);
    try {
      assert.deepEqual(await again.unwrap(handle, wrapped, aad), dk);
    } finally {
      await again.close();
    }
  });

  test('a missing, foreign, loosely-permitted or weakened keyring is refused', async () => {
    await rejects(openLocalKeyring(path.join(dir, 'nope.json'), PASSPHRASE), 'misconfigured');
    const foreign = path.join(dir, 'foreign.json');
    fs.writeFileSync(foreign, '{"hello":1}', { mode: 0o600 });
    await rejects(openLocalKeyring(foreign, PASSPHRASE), 'misconfigured');

    const loose = path.join(dir, 'loose.json');
    fs.copyFileSync(file, loose);
    fs.chmodSync(loose, 0o644);
    const e = await rejects(openLocalKeyring(loose, PASSPHRASE), 'misconfigured');
    assert.match(e.message, /chmod 600/);

    // The KDF parameters are authenticated: lowering N does not open the keyring, and absurd ones are refused unread.
    const f = JSON.parse(fs.readFileSync(file, 'utf8'));
    const weak = path.join(dir, 'weak.json');
    fs.writeFileSync(weak, JSON.stringify({ ...f, kdf: { ...f.kdf, N: 2 ** 15 } }), { mode: 0o600 });
    await rejects(openLocalKeyring(weak, PASSPHRASE), 'bad_passphrase');
    const huge = path.join(dir, 'huge.json');
    fs.writeFileSync(huge, JSON.stringify({ ...f, kdf: { ...f.kdf, N: 2 ** 30 } }), { mode: 0o600 });
    await rejects(openLocalKeyring(huge, PASSPHRASE), 'misconfigured');
  });

  test('escrow: a keyring restored from its escrow copy into a fresh directory unwraps what the original wrapped', async () => {
    const escrowDir = fs.mkdtempSync(path.join(tmpRoot, 'escrow-'));
    const escrow = path.join(escrowDir, 'custos-keyring.escrow.json');
    const { sha256 } = await kr.exportEscrow(escrow);
    assert.match(sha256, /^[0-9a-f]{64}$/);
    assert.equal(fs.statSync(escrow).mode & 0o777, 0o600);
    await rejects(kr.exportEscrow(escrow), 'misconfigured'); // never overwrites an escrow copy

    // Disaster: the data directory is gone. Restore into a fresh one.
    const fresh = fs.mkdtempSync(path.join(tmpRoot, 'restored-'));
    const restoredPath = path.join(fresh, 'keys', 'keyring.json');
    await rejects(importLocalKeyringEscrow(escrow, restoredPath, 'not the passphrase'), 'bad_passphrase');
    assert.ok(!fs.existsSync(restoredPath), 'nothing is written before the passphrase is proven');
    const restored = await importLocalKeyringEscrow(escrow, restoredPath, PASSPHRASE);
    try {
      assert.equal(fs.statSync(restoredPath).mode & 0o777, 0o600);
      assert.deepEqual(await restored.unwrap(handle, wrapped, aad), dk);
      await rejects(importLocalKeyringEscrow(escrow, restoredPath, PASSPHRASE), 'misconfigured');
    } finally {
      await restored.close();
    }
  });

  test('crypto-shredding limit: an escrow copy made before destroyKek still holds the KEK', async () => {
    const h = await kr.createKek('project-s.epoch-1');
    const w = await kr.wrap(h, dk, aad);
    const escrow = path.join(fs.mkdtempSync(path.join(tmpRoot, 'escrow-old-')), 'old.json');
    await kr.exportEscrow(escrow);
    await kr.destroyKek(h);
    await rejects(kr.unwrap(h, w, aad), 'destroyed');
    await kr.destroyKek(h); // idempotent
    // The live keyring has shredded it; the old copy has not. docs/keys.md: shred the copies too.
    const old = await importLocalKeyringEscrow(
      escrow,
      path.join(path.dirname(escrow), 'restored.json'),
      PASSPHRASE,
    );
    try {
      assert.deepEqual(await old.unwrap(h, w, aad), dk);
    } finally {
      await old.close();
    }
  });

  test('changePassphrase re-seals: the new passphrase opens it, the old one no longer does', async () => {
    const copyDir = fs.mkdtempSync(path.join(tmpRoot, 'rekey-'));
    const copy = path.join(copyDir, 'keyring.json');
    await kr.exportEscrow(copy);
    const k2 = await openLocalKeyring(copy, PASSPHRASE);
    try {
      await k2.changePassphrase('a new and longer passphrase');
    } finally {
      await k2.close();
    }
    await rejects(openLocalKeyring(copy, PASSPHRASE), 'bad_passphrase');
    const k3 = await openLocalKeyring(copy, 'a new and longer passphrase');
    try {
      assert.deepEqual(await k3.unwrap(handle, wrapped, aad), dk);
    } finally {
      await k3.close();
    }
  });

  test('bad arguments are programming errors, not provider errors', async () => {
    await assert.rejects(kr.createKek('has space'), RangeError);
    await assert.rejects(kr.wrap(handle, randomBytes(16), aad), RangeError);
  });
});

// ---------------------------------------------------------------------------------------------
// pkcs11 (SoftHSMv2)

const pkcs11js = (): typeof Pkcs11Js => createRequire(import.meta.url)('pkcs11js') as typeof Pkcs11Js;

/**
 * A session of the test's own on the token, through the binding directly. The module is shared
 * with the providers in this process, so this never calls C_Finalize.
 */
function rawSession(t: SoftHsmToken) {
  const p = pkcs11js();
  const lib = new p.PKCS11();
  lib.load(t.module);
  try {
    lib.C_Initialize();
  } catch (e) {
    if ((e as Error).message !== 'CKR_CRYPTOKI_ALREADY_INITIALIZED') throw e;
  }
  const slot = lib.C_GetSlotList(true).find((s) => lib.C_GetTokenInfo(s).label.trim() === t.label);
  assert.ok(slot, 'test token not found');
  const session = lib.C_OpenSession(slot, p.CKF_RW_SESSION | p.CKF_SERIAL_SESSION);
  return {
    p,
    lib,
    session,
    login() {
      try {
        lib.C_Login(session, p.CKU_USER, t.pin);
      } catch (e) {
        if ((e as Error).message !== 'CKR_USER_ALREADY_LOGGED_IN') throw e;
      }
    },
    findByLabel(label: string) {
      lib.C_FindObjectsInit(session, [{ type: p.CKA_LABEL, value: label }]);
      try {
        return lib.C_FindObjects(session, 10);
      } finally {
        lib.C_FindObjectsFinal(session);
      }
    },
    close() {
      lib.C_CloseSession(session);
    },
  };
}

contract('pkcs11 (SoftHSMv2)', softhsmSkip, async () => ({
  open: () => openPkcs11Provider({ module: token!.module, tokenLabel: token!.label, pin: token!.pin }),
  unknownHandle: 'project-z.epoch-1#0123456789abcdef',
}));

describe('pkcs11 provider (SoftHSMv2)', { skip: softhsmSkip }, () => {
  let hsm: Pkcs11Provider;
  before(async () => {
    hsm = await openPkcs11Provider({ module: token!.module, tokenLabel: token!.label, pin: token!.pin });
  });
  after(async () => hsm?.close());

  test('the token does AES-GCM with the AAD exactly as node:crypto does (mechanism parameters are right)', () => {
    const raw = rawSession(token!);
    const { p, lib, session } = raw;
    try {
      raw.login();
      // A throwaway session key whose value we know (never how KEKs are made).
      const value = randomBytes(32);
      const key = lib.C_CreateObject(session, [
        { type: p.CKA_CLASS, value: p.CKO_SECRET_KEY },
        { type: p.CKA_KEY_TYPE, value: p.CKK_AES },
        { type: p.CKA_TOKEN, value: false },
        { type: p.CKA_VALUE, value },
        { type: p.CKA_ENCRYPT, value: true },
      ]);
      const iv = randomBytes(12);
      const aad = aadFor('interop');
      const plain = randomBytes(32);
      lib.C_EncryptInit(
        session,
        {
          mechanism: p.CKM_AES_GCM,
          parameter: { type: p.CK_PARAMS_AES_GCM_v240, iv, ivBits: 96, aad, tagBits: 128 },
        } as Pkcs11Js.Mechanism,
        key,
      );
      const hsmOut = lib.C_Encrypt(session, plain, Buffer.alloc(48));
      const c = createCipheriv('aes-256-gcm', value, iv);
      c.setAAD(aad);
      assert.deepEqual(hsmOut, Buffer.concat([c.update(plain), c.final(), c.getAuthTag()]));
      lib.C_DestroyObject(session, key);
    } finally {
      raw.close();
    }
  });

  test('a KEK is generated in the token as a sensitive, non-extractable AES-256 key', async () => {
    const h = await hsm.createKek('project-x.epoch-1');
    assert.deepEqual(await hsm.describeKek(h), {
      sensitive: true,
      extractable: false,
      alwaysSensitive: true,
      neverExtractable: true,
      valueLen: 32,
    });
    // The same, read through the binding on a session of our own.
    const raw = rawSession(token!);
    const { p, lib, session } = raw;
    try {
      raw.login();
      const [obj, ...more] = raw.findByLabel(h);
      assert.ok(obj);
      assert.equal(more.length, 0);
      const attrs = lib.C_GetAttributeValue(session, obj, [
        { type: p.CKA_SENSITIVE },
        { type: p.CKA_EXTRACTABLE },
        { type: p.CKA_NEVER_EXTRACTABLE },
        { type: p.CKA_TOKEN },
        { type: p.CKA_PRIVATE },
        { type: p.CKA_WRAP },
      ]);
      assert.deepEqual(
        attrs.map((a) => a.value[0]),
        [1, 0, 1, 1, 1, 0],
      );
      assert.throws(
        () => lib.C_GetAttributeValue(session, obj, [{ type: p.CKA_VALUE }]),
        /CKR_ATTRIBUTE_SENSITIVE/,
      );
      // destroyKek is C_DestroyObject: the object is gone from the token.
      await hsm.destroyKek(h);
      assert.equal(raw.findByLabel(h).length, 0);
    } finally {
      raw.close();
    }
  });

  test('misconfiguration fails with misconfigured and fixed messages', async () => {
    const e1 = await rejects(
      openPkcs11Provider({
        module: '/nonexistent/libpkcs11-nope.so',
        tokenLabel: token!.label,
        pin: token!.pin,
      }),
      'misconfigured',
    );
    assert.ok(!e1.message.includes('nonexistent'), 'the loader message (with the path) is not passed on');
    await rejects(
      openPkcs11Provider({ module: 'relative/lib.so', tokenLabel: token!.label, pin: token!.pin }),
      'misconfigured',
    );
    await rejects(
      openPkcs11Provider({ module: token!.module, tokenLabel: 'no-such-token', pin: token!.pin }),
      'misconfigured',
    );
    await rejects(
      openPkcs11Provider({ module: token!.module, tokenLabel: token!.label, pin: '' }),
      'misconfigured',
    );
  });

  test('a wrong PIN fails with misconfigured, naming CKR_PIN_INCORRECT and not the PIN', async () => {
    // Close ours first: while the application is logged in, SoftHSM accepts any second C_Login as "already logged in".
    await hsm.close();
    const e = await rejects(
      openPkcs11Provider({ module: token!.module, tokenLabel: token!.label, pin: 'not-the-pin-4321' }),
      'misconfigured',
    );
    assert.match(e.message, /CKR_PIN_INCORRECT/);
    assert.ok(!e.message.includes('not-the-pin'));
    hsm = await openPkcs11Provider({ module: token!.module, tokenLabel: token!.label, pin: token!.pin });
  });

  test('a token that is no longer logged in gives a clear error, not "unknown key"', async () => {
    const h = await hsm.createKek('project-y.epoch-1');
    const dk = randomBytes(32);
    const w = await hsm.wrap(h, dk, aadFor('y'));
    const raw = rawSession(token!);
    try {
      raw.lib.C_Logout(raw.session); // login state is per application: this logs our provider out too
    } finally {
      raw.close();
    }
    const e = await rejects(hsm.unwrap(h, w, aadFor('y')), 'unavailable');
    assert.match(e.message, /not logged in/);
    await rejects(hsm.createKek('project-y.epoch-2'), 'unavailable');
    // Reopening logs in again, and the KEK is still there.
    await hsm.close();
    hsm = await openPkcs11Provider({ module: token!.module, tokenLabel: token!.label, pin: token!.pin });
    assert.deepEqual(await hsm.unwrap(h, w, aadFor('y')), dk);
  });
});

// ---------------------------------------------------------------------------------------------
// aws-kms (the AWS SDK v3 against a local KMS stub)

const credentials = { accessKeyId: 'AKIAEXAMPLESTUB00000', secretAccessKey: 'stub-secret-not-a-real-key' };

function recordingLogger() {
  const events: { event: string; fields: LogFields }[] = [];
  const push = (event: string, fields: LogFields = {}) => events.push({ event, fields });
  const log: Logger = { debug: push, info: push, warn: push, error: push };
  return { log, events };
}

let contractStub: KmsStub | undefined;
contract('aws-kms (KMS stub)', false, async () => {
  contractStub = await startKmsStub();
  const stub = contractStub;
  return {
    open: async () => openAwsKmsProvider({ region: stub.region, endpoint: stub.url, credentials }),
    unknownHandle: `arn:aws:kms:${stub.region}:111122223333:key/${randomUUID()}`,
    cleanup: () => stub.close(),
  };
});

describe('aws-kms provider (KMS stub)', () => {
  let stub: KmsStub;
  before(async () => {
    stub = await startKmsStub({ region: 'eu-west-1' });
  });
  after(async () => stub?.close());

  test('every request goes through the egress port, signed, to the configured endpoint', async () => {
    const { log, events } = recordingLogger();
    const kms = openAwsKmsProvider({ region: stub.region, endpoint: stub.url, credentials, log });
    try {
      const before = stub.requests.length;
      const h = await kms.createKek('project-k.epoch-1');
      assert.match(h, /^arn:aws:kms:eu-west-1:111122223333:key\//);
      const dk = randomBytes(32);
      const w = await kms.wrap(h, dk, aadFor('k'));
      assert.deepEqual(await kms.unwrap(h, w, aadFor('k')), dk);
      const seen = stub.requests.slice(before);
      assert.deepEqual(
        seen.map((r) => r.target),
        ['TrentService.CreateKey', 'TrentService.Encrypt', 'TrentService.Decrypt'],
      );
      assert.ok(seen.every((r) => r.hasAuthorization));
      const egress = events.filter((e) => e.event === 'egress.request');
      assert.equal(egress.length, seen.length, 'one egress record per request');
      for (const e of egress) assert.deepEqual(e.fields, { code: 'aws-kms', host: '127.0.0.1' });
    } finally {
      await kms.close();
    }
  });

  test('destroyKek disables the key at once and schedules its deletion (7 days)', async () => {
    const kms = openAwsKmsProvider({ region: stub.region, endpoint: stub.url, credentials });
    try {
      const h = await kms.createKek('project-m.epoch-1');
      const w = await kms.wrap(h, randomBytes(32), aadFor('m'));
      const before = stub.requests.length;
      await kms.destroyKek(h);
      assert.deepEqual(
        stub.requests.slice(before).map((r) => r.target),
        ['TrentService.DisableKey', 'TrentService.ScheduleKeyDeletion'],
      );
      assert.equal(stub.keyState(h), 'PendingDeletion');
      await rejects(kms.unwrap(h, w, aadFor('m')), 'destroyed');
      await kms.destroyKek(h); // again: already pending deletion, not an error
    } finally {
      await kms.close();
    }
  });

  test('the AAD travels as the encryption context under custos:aad', async () => {
    // Decrypt through the stub by hand with the context the provider should have used.
    const kms = openAwsKmsProvider({ region: stub.region, endpoint: stub.url, credentials });
    try {
      const h = await kms.createKek('project-n.epoch-1');
      const dk = randomBytes(32);
      const aad = aadFor('n');
      const w = await kms.wrap(h, dk, aad);
      const res = await fetch(stub.url, {
        method: 'POST',
        headers: {
          'content-type': 'application/x-amz-json-1.1',
          'x-amz-target': 'TrentService.Decrypt',
          authorization: 'AWS4-HMAC-SHA256 stub',
        },
        body: JSON.stringify({
          KeyId: h,
          CiphertextBlob: w.toString('base64'),
          EncryptionContext: { [KMS_AAD_CONTEXT_KEY]: aad.toString('base64') },
        }),
      });
      assert.equal(res.status, 200);
      assert.deepEqual(Buffer.from(((await res.json()) as { Plaintext: string }).Plaintext, 'base64'), dk);
    } finally {
      await kms.close();
    }
  });

  test('the stub refuses unsigned requests with a KMS-shaped error', async () => {
    const res = await fetch(stub.url, {
      method: 'POST',
      headers: { 'content-type': 'application/x-amz-json-1.1', 'x-amz-target': 'TrentService.CreateKey' },
      body: '{}',
    });
    assert.equal(res.status, 400);
    assert.equal(((await res.json()) as { __type: string }).__type, 'MissingAuthenticationTokenException');
  });

  test('KMS down (nothing listening) fails with unavailable, without the URL in the message', async () => {
    const dead = await startKmsStub();
    const url = dead.url;
    await dead.close();
    const kms = openAwsKmsProvider({ region: 'us-east-1', endpoint: url, credentials, maxAttempts: 2 });
    try {
      const e = await rejects(kms.createKek('project-o.epoch-1'), 'unavailable');
      assert.ok(!e.message.includes(url.replace('http://', '')));
      await rejects(
        kms.unwrap(`arn:aws:kms:us-east-1:111122223333:key/${randomUUID()}`, randomBytes(80), aadFor('o')),
        'unavailable',
      );
    } finally {
      await kms.close();
    }
  });

  test('configuration is checked when the provider is built', () => {
    assert.throws(
      () => openAwsKmsProvider({ region: 'us-east-1', endpoint: 'http://kms.example.com', credentials }),
      (e: unknown) => e instanceof KeyProviderError && e.code === 'misconfigured',
    );
    assert.throws(
      () => openAwsKmsProvider({ region: '', credentials }),
      (e: unknown) => e instanceof KeyProviderError && e.code === 'misconfigured',
    );
  });
});
