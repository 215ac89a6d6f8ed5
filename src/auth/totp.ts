import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { Secret, TOTP } from 'otpauth';
import { CustosError } from '../kernel/errors.ts';
import { readOrCreateKeyFile } from '../kernel/key-file.ts';

/**
 * TOTP (RFC 6238) as every authenticator app speaks it: HMAC-SHA1, 6 digits, 30-second steps, a
 * 160-bit secret (RFC 4226 section 4 recommends 160 bits). A code is accepted in the current step
 * and one step either side (clock drift, RFC 6238 section 5.2), and never twice: the caller keeps the
 * last step used and refuses any step at or before it.
 */
export const TOTP_PARAMS = Object.freeze({
  algorithm: 'SHA1',
  digits: 6,
  period: 30,
  window: 1,
  secretBytes: 20,
});

function totp(secretBase32: string, label = 'user'): TOTP {
  return new TOTP({
    issuer: 'Custos',
    label,
    secret: Secret.fromBase32(secretBase32),
    algorithm: TOTP_PARAMS.algorithm,
    digits: TOTP_PARAMS.digits,
    period: TOTP_PARAMS.period,
  });
}

/** A new random secret, base32 (what a user types into an authenticator app). */
export function newTotpSecret(): string {
  return new Secret({ size: TOTP_PARAMS.secretBytes }).base32;
}

/** The `otpauth://totp/Custos:<label>?…` URI for a QR code (Key Uri Format). */
export function totpUri(secretBase32: string, label: string): string {
  return totp(secretBase32, label).toString();
}

/** The time step (RFC 6238 T) of instant `nowMs`. */
export function totpStep(nowMs: number): number {
  return Math.floor(nowMs / 1000 / TOTP_PARAMS.period);
}

/** The code of `secretBase32` at `nowMs` (tests, and the login page's self-check later). */
export function totpCode(secretBase32: string, nowMs: number): string {
  return totp(secretBase32).generate({ timestamp: nowMs });
}

/**
 * The time step at which `code` is valid for `secretBase32` around `nowMs` (within ±1 step), or
 * undefined. Malformed codes (not six digits) match nothing.
 */
export function matchTotp(secretBase32: string, code: string, nowMs: number): number | undefined {
  if (!/^\d{6}$/.test(code)) return undefined;
  const delta = totp(secretBase32).validate({ token: code, timestamp: nowMs, window: TOTP_PARAMS.window });
  return delta === null ? undefined : totpStep(nowMs) + delta;
}

const FORMAT = 'v1';

/**
 * Seals TOTP secrets for storage in `app_user.mfa_secret`: AES-256-GCM (node:crypto), a fresh
 * 96-bit nonce per seal, and `custos:totp:v1|<user id>` as associated data so that a sealed secret
 * copied onto another user's row does not open. The server must be able to read the secret (to
 * compute codes), so it cannot be hashed; the key is 32 random bytes in
 * `<data dir>/keys/totp-secret.key` (mode 0600), never in a database (DESIGN.md rule 5): a dump of
 * the database reveals no TOTP secret. Format: `v1.<nonce>.<ciphertext‖tag>`, base64url.
 */
export class TotpSealer {
  private constructor(private readonly key: Buffer) {}

  static fromKeyFile(file: string): TotpSealer {
    const text = readOrCreateKeyFile(file, () => `${randomBytes(32).toString('base64url')}\n`);
    const key = Buffer.from(text.trim(), 'base64url');
    if (key.length !== 32)
      throw new CustosError('CONFIG_INVALID', [
        { severity: 'error', code: 'security', diagnostics: 'The TOTP secret key must be 32 bytes.' },
      ]);
    return new TotpSealer(key);
  }

  seal(userId: string, secretBase32: string): string {
    const nonce = randomBytes(12);
    const cipher = createCipheriv('aes-256-gcm', this.key, nonce);
    cipher.setAAD(aad(userId));
    const ct = Buffer.concat([cipher.update(secretBase32, 'utf8'), cipher.final(), cipher.getAuthTag()]);
    return `${FORMAT}.${nonce.toString('base64url')}.${ct.toString('base64url')}`;
  }

  /** The secret, or `SEALED_DATA_INVALID` when the value was altered, moved or sealed under another key. */
  open(userId: string, sealed: string): string {
    const [format, nonce, body] = sealed.split('.');
    const invalid = () => new CustosError('SEALED_DATA_INVALID');
    if (format !== FORMAT || !nonce || !body) throw invalid();
    const ct = Buffer.from(body, 'base64url');
    if (ct.length <= 16) throw invalid();
    try {
      const decipher = createDecipheriv('aes-256-gcm', this.key, Buffer.from(nonce, 'base64url'));
      decipher.setAAD(aad(userId));
      decipher.setAuthTag(ct.subarray(ct.length - 16));
      return Buffer.concat([decipher.update(ct.subarray(0, ct.length - 16)), decipher.final()]).toString(
        'utf8',
      );
    } catch {
      throw invalid();
    }
  }
}

function aad(userId: string): Buffer {
  return Buffer.from(`custos:totp:${FORMAT}|${userId}`, 'utf8');
}
