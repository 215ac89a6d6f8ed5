/**
 * C2SP signed notes with Ed25519 signatures, and C2SP tlog checkpoints carried in them.
 *
 * All signing and verification is delegated to node:crypto (`crypto.sign(null, …)` / `crypto.verify`);
 * this module only implements the text encodings of the specs.
 *
 * @see https://c2sp.org/signed-note
 * @see https://c2sp.org/tlog-checkpoint
 * @module
 */
import { createHash, createPrivateKey, createPublicKey, sign, verify, type KeyObject } from 'node:crypto';

/** Signature type byte for Ed25519 in signed-note keys and key IDs. */
const ALG_ED25519 = 0x01;
/** The signature line prefix: EM DASH (U+2014) followed by a space. */
const SIG_PREFIX = '\u2014 ';
/** Maximum number of signature lines accepted, as in golang.org/x/mod/sumdb/note. */
const MAX_SIGNATURES = 100;
/** DER prefixes wrapping a raw 32-byte Ed25519 public key (SPKI) or seed (PKCS#8), RFC 8410. */
const SPKI_ED25519_PREFIX = Buffer.from('302a300506032b6570032100', 'hex');
const PKCS8_ED25519_PREFIX = Buffer.from('302e020100300506032b657004220420', 'hex');

/** Why a note, key or checkpoint was rejected. */
export type SignedNoteErrorCode =
  'malformed_note' | 'invalid_signature' | 'no_verified_signature' | 'malformed_key' | 'malformed_checkpoint';

/** Thrown by the parsers and {@link verifyNote}. */
export class SignedNoteError extends Error {
  constructor(
    readonly code: SignedNoteErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'SignedNoteError';
  }
}

/** A parsed verifier key (vkey). */
export interface VerifierKey {
  name: string;
  /** 4-byte key ID. */
  keyId: Buffer;
  /** Raw 32-byte Ed25519 public key. */
  publicKeyRaw: Buffer;
  publicKey: KeyObject;
}

/** A parsed Go-style signer key (`PRIVATE+KEY+name+hexKeyId+base64(0x01||seed)`). */
export interface SignerKey {
  name: string;
  keyId: Buffer;
  privateKey: KeyObject;
  publicKeyRaw: Buffer;
}

/** Key names must be non-empty and contain no '+' and no whitespace (signed-note §"Signatures"). */
function checkName(name: string): void {
  if (name.length === 0 || name.includes('+') || /\s/u.test(name)) {
    throw new SignedNoteError('malformed_key', `invalid key name ${JSON.stringify(name)}`);
  }
}

/** Strict base64 decode: rejects anything that does not re-encode to the same string. */
function decodeBase64(s: string): Buffer | undefined {
  const b = Buffer.from(s, 'base64');
  return b.toString('base64') === s ? b : undefined;
}

function ed25519PublicKey(raw: Buffer): KeyObject {
  return createPublicKey({ key: Buffer.concat([SPKI_ED25519_PREFIX, raw]), format: 'der', type: 'spki' });
}

function rawPublicKey(key: KeyObject): Buffer {
  const pub = key.type === 'private' ? createPublicKey(key) : key;
  const der = pub.export({ format: 'der', type: 'spki' });
  return Buffer.from(der.subarray(der.length - 32));
}

function checkEd25519(key: KeyObject, type: 'private' | 'public'): void {
  if (key.type !== type || key.asymmetricKeyType !== 'ed25519') {
    throw new SignedNoteError('malformed_key', `expected an Ed25519 ${type} key`);
  }
}

/**
 * Ed25519 key ID: the first 4 bytes of SHA-256(name || 0x0A || 0x01 || publicKey).
 *
 * @see https://c2sp.org/signed-note#signatures
 */
export function keyId(name: string, publicKeyRaw: Buffer): Buffer {
  return createHash('sha256')
    .update(name, 'utf8')
    .update(Buffer.from([0x0a, ALG_ED25519]))
    .update(publicKeyRaw)
    .digest()
    .subarray(0, 4);
}

/**
 * Encodes an Ed25519 verifier key as `name+hexKeyId+base64(0x01 || publicKey)`.
 *
 * @see https://c2sp.org/signed-note#verifier-keys
 */
export function formatVerifierKey(name: string, publicKeyRaw: Buffer): string {
  checkName(name);
  if (publicKeyRaw.length !== 32)
    throw new SignedNoteError('malformed_key', 'Ed25519 public key must be 32 bytes');
  const enc = Buffer.concat([Buffer.from([ALG_ED25519]), publicKeyRaw]).toString('base64');
  return `${name}+${keyId(name, publicKeyRaw).toString('hex')}+${enc}`;
}

/**
 * Parses an Ed25519 verifier key and checks that its key ID matches the name and public key.
 *
 * @throws SignedNoteError (`malformed_key`) for any other key type or a malformed key.
 * @see https://c2sp.org/signed-note#verifier-keys
 */
export function parseVerifierKey(vkey: string): VerifierKey {
  const m = /^([^+]+)\+([0-9a-f]{8})\+(.+)$/u.exec(vkey);
  if (!m) throw new SignedNoteError('malformed_key', 'malformed verifier key');
  const [, name, hex, b64] = m as unknown as [string, string, string, string];
  checkName(name);
  const key = decodeBase64(b64);
  if (!key || key.length !== 33 || key[0] !== ALG_ED25519) {
    throw new SignedNoteError('malformed_key', 'verifier key is not an Ed25519 key');
  }
  const publicKeyRaw = key.subarray(1);
  const id = keyId(name, publicKeyRaw);
  if (id.toString('hex') !== hex) throw new SignedNoteError('malformed_key', 'verifier key ID mismatch');
  return { name, keyId: id, publicKeyRaw, publicKey: ed25519PublicKey(publicKeyRaw) };
}

/**
 * Parses a Go-style Ed25519 signer key `PRIVATE+KEY+name+hexKeyId+base64(0x01 || seed)`
 * (golang.org/x/mod/sumdb/note) and checks its key ID against the derived public key.
 *
 * @see https://pkg.go.dev/golang.org/x/mod/sumdb/note#NewSigner
 */
export function parseSignerKey(skey: string): SignerKey {
  const m = /^PRIVATE\+KEY\+([^+]+)\+([0-9a-f]{8})\+(.+)$/u.exec(skey);
  if (!m) throw new SignedNoteError('malformed_key', 'malformed signer key');
  const [, name, hex, b64] = m as unknown as [string, string, string, string];
  checkName(name);
  const key = decodeBase64(b64);
  if (!key || key.length !== 33 || key[0] !== ALG_ED25519) {
    throw new SignedNoteError('malformed_key', 'signer key is not an Ed25519 key');
  }
  const privateKey = createPrivateKey({
    key: Buffer.concat([PKCS8_ED25519_PREFIX, key.subarray(1)]),
    format: 'der',
    type: 'pkcs8',
  });
  const publicKeyRaw = rawPublicKey(privateKey);
  const id = keyId(name, publicKeyRaw);
  if (id.toString('hex') !== hex) throw new SignedNoteError('malformed_key', 'signer key ID mismatch');
  return { name, keyId: id, privateKey, publicKeyRaw };
}

/** Note text must be non-empty, end with a newline, and contain no control characters other than newline. */
function checkText(text: string): void {
  // eslint-disable-next-line no-control-regex
  if (!text.endsWith('\n') || /[\u0000-\u0009\u000b-\u001f\u007f]/u.test(text)) {
    throw new SignedNoteError(
      'malformed_note',
      'note text must end with a newline and have no control characters',
    );
  }
}

/**
 * Signs `text` (which must end with a newline) with an Ed25519 private key and returns the serialized
 * note: the text, a blank line, and the line `— name base64(keyId || signature)`. The signature covers
 * the text including its final newline.
 *
 * @see https://c2sp.org/signed-note#format
 */
export function signNote(text: string, name: string, privateKey: KeyObject): string {
  checkName(name);
  checkText(text);
  checkEd25519(privateKey, 'private');
  const id = keyId(name, rawPublicKey(privateKey));
  const sig = sign(null, Buffer.from(text, 'utf8'), privateKey);
  return `${text}\n${SIG_PREFIX}${name} ${Buffer.concat([id, sig]).toString('base64')}\n`;
}

/** Result of a successful {@link verifyNote}. */
export interface VerifiedNote {
  /** The signed text, including its final newline. */
  text: string;
  /** Names of the verifier keys whose signatures verified, in note order. */
  verifiedBy: string[];
}

/**
 * Verifies a serialized signed note against a set of Ed25519 verifier keys.
 *
 * Signatures from unknown keys (name and key ID not among `vkeys`) are ignored. As in
 * golang.org/x/mod/sumdb/note, a signature from a known key that does not verify is an error.
 *
 * @throws SignedNoteError `malformed_note`, `invalid_signature`, or `no_verified_signature` when no
 *   known key signed the note; `malformed_key` for a bad entry in `vkeys`.
 * @see https://c2sp.org/signed-note
 */
export function verifyNote(note: string, vkeys: string[]): VerifiedNote {
  const verifiers = vkeys.map(parseVerifierKey);
  if (!note.endsWith('\n')) throw new SignedNoteError('malformed_note', 'note must end with a newline');
  const split = note.lastIndexOf('\n\n');
  if (split < 0) throw new SignedNoteError('malformed_note', 'note has no signature block');
  const text = note.slice(0, split + 1);
  checkText(text);
  const lines = note.slice(split + 2, -1).split('\n');
  if (lines.length > MAX_SIGNATURES) throw new SignedNoteError('malformed_note', 'too many signatures');
  const verifiedBy: string[] = [];
  const message = Buffer.from(text, 'utf8');
  for (const line of lines) {
    const m = /^\u2014 ([^ ]+) ([A-Za-z0-9+/=]+)$/u.exec(line);
    if (!m) throw new SignedNoteError('malformed_note', 'malformed signature line');
    const [, name, b64] = m as unknown as [string, string, string];
    const raw = decodeBase64(b64);
    if (!raw || raw.length < 5) throw new SignedNoteError('malformed_note', 'malformed signature');
    const id = raw.subarray(0, 4);
    const v = verifiers.find((k) => k.name === name && k.keyId.equals(id));
    if (!v) continue;
    const sig = raw.subarray(4);
    if (sig.length !== 64 || !verify(null, message, v.publicKey, sig)) {
      throw new SignedNoteError(
        'invalid_signature',
        `invalid signature for key ${name}+${id.toString('hex')}`,
      );
    }
    if (!verifiedBy.includes(name)) verifiedBy.push(name);
  }
  if (verifiedBy.length === 0) throw new SignedNoteError('no_verified_signature', 'no verifiable signatures');
  return { text, verifiedBy };
}

/** A parsed checkpoint body. */
export interface Checkpoint {
  origin: string;
  size: number;
  rootHash: Buffer;
  /** Optional extension lines after the root hash, in order, without newlines. */
  extensions: string[];
}

/**
 * Formats a checkpoint body: `origin\nsize\nbase64(rootHash)\n`. Sign it with {@link signNote}.
 *
 * @see https://c2sp.org/tlog-checkpoint#note-text
 */
export function formatCheckpoint(origin: string, size: number, rootHash: Buffer): string {
  if (origin.length === 0 || origin.includes('\n')) {
    throw new SignedNoteError('malformed_checkpoint', 'origin must be a non-empty single line');
  }
  if (!Number.isSafeInteger(size) || size < 0)
    throw new SignedNoteError('malformed_checkpoint', 'invalid size');
  if (rootHash.length !== 32) throw new SignedNoteError('malformed_checkpoint', 'root hash must be 32 bytes');
  return `${origin}\n${size}\n${rootHash.toString('base64')}\n`;
}

/**
 * Parses a checkpoint body (the text of a verified note): origin, decimal tree size without leading
 * zeros, base64 32-byte root hash, then optional non-empty extension lines.
 *
 * @see https://c2sp.org/tlog-checkpoint#note-text
 */
export function parseCheckpoint(text: string): Checkpoint {
  if (!text.endsWith('\n'))
    throw new SignedNoteError('malformed_checkpoint', 'checkpoint must end with a newline');
  const lines = text.slice(0, -1).split('\n');
  if (lines.length < 3)
    throw new SignedNoteError('malformed_checkpoint', 'checkpoint needs at least 3 lines');
  const [origin, sizeLine, rootLine, ...extensions] = lines as [string, string, string, ...string[]];
  if (origin.length === 0) throw new SignedNoteError('malformed_checkpoint', 'empty origin');
  if (!/^(0|[1-9][0-9]*)$/u.test(sizeLine) || !Number.isSafeInteger(Number(sizeLine))) {
    throw new SignedNoteError('malformed_checkpoint', 'invalid tree size');
  }
  const rootHash = decodeBase64(rootLine);
  if (!rootHash || rootHash.length !== 32)
    throw new SignedNoteError('malformed_checkpoint', 'invalid root hash');
  if (extensions.some((l) => l.length === 0)) {
    throw new SignedNoteError('malformed_checkpoint', 'empty extension line');
  }
  return { origin, size: Number(sizeLine), rootHash, extensions };
}
