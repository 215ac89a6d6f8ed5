import fs from 'node:fs';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import type { JSONWebKeySet, JWK } from 'jose';
import { CustosError } from '../kernel/errors.ts';
import { PRIVATE_JWK_MEMBERS, readOrCreateKeyFile } from '../kernel/key-file.ts';
import { ACCESS_TOKEN_ALG } from './access-token.ts';

/**
 * The access-token signing keys (`<data dir>/keys/token-signing.jwks.json`, mode 0600): a private
 * JWKS whose FIRST key signs new tokens; every key in it verifies (and is published at
 * `/oauth/jwks`). Rotation ({@link rotateSigningKeys}) puts a new key first and keeps the previous
 * one, so tokens signed before the rotation (at most five minutes old) keep verifying; older keys
 * are dropped. The server reads the file at start: a rotation takes effect at the next restart.
 */

function newSigningKey(): JWK {
  const jwk = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: randomBytes(12).toString('base64url'), alg: ACCESS_TOKEN_ALG, use: 'sig' } as JWK;
}

/** The private signing JWKS from `file`, created with one ES256 key when missing. */
export function loadSigningKeys(file: string): JSONWebKeySet {
  const text = readOrCreateKeyFile(file, () => JSON.stringify({ keys: [newSigningKey()] }, null, 2) + '\n');
  let jwks: unknown;
  try {
    jwks = JSON.parse(text);
  } catch {
    throw new CustosError('CONFIG_INVALID');
  }
  const keys = (jwks as { keys?: unknown } | null)?.keys;
  // Every key private, and the first usable for ES256 (oidc-provider signs with it).
  const es256 = (k: JWK) =>
    k.kty === 'EC' && k.crv === 'P-256' && (k.alg ?? ACCESS_TOKEN_ALG) === ACCESS_TOKEN_ALG;
  if (
    !Array.isArray(keys) ||
    keys.length === 0 ||
    keys.some((k: JWK) => typeof k?.d !== 'string') ||
    !es256(keys[0])
  ) {
    throw new CustosError('CONFIG_INVALID');
  }
  return { keys: keys as JWK[] };
}

/**
 * Rotates the signing keys: a new ES256 key first, the previous first key kept (to verify the
 * tokens it signed), any older key removed. Written atomically (temp file and rename, mode 0600).
 * Returns the new key's `kid`, the kept one's and how many were removed.
 */
export function rotateSigningKeys(file: string): {
  kid: string;
  previousKid: string | undefined;
  removed: number;
} {
  const current = loadSigningKeys(file).keys;
  const next = newSigningKey();
  const keys = [next, current[0]!];
  const tmp = `${file}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, JSON.stringify({ keys }, null, 2) + '\n', { mode: 0o600 });
  fs.renameSync(tmp, file);
  return { kid: next.kid!, previousKid: current[0]!.kid, removed: current.length - 1 };
}

/** The public members of a private JWK. */
export function publicPart(jwk: JWK): JWK {
  return Object.fromEntries(Object.entries(jwk).filter(([member]) => !PRIVATE_JWK_MEMBERS.includes(member)));
}
