import { randomBytes } from 'node:crypto';
import { hash, verify, type Algorithm } from '@node-rs/argon2';
import { CustosError } from '../kernel/errors.ts';
import { isCommonPassword } from './common-passwords.ts';

/**
 * Argon2id cost, as OWASP's Password Storage Cheat Sheet recommends for Argon2id (its first
 * configuration): m = 19 MiB (19456 KiB), t = 2 iterations, p = 1 lane; 16-byte random salt and
 * 32-byte output (the library's defaults). docs/users.md has the measured cost per login
 * (`npm run bench:login`). Changing these only affects new hashes; {@link needsRehash} tells the login
 * path to upgrade an older hash the next time its password is presented.
 */
export const ARGON2_PARAMS = Object.freeze({ memoryCost: 19_456, timeCost: 2, parallelism: 1 });

/** The password policy (docs/users.md). Lengths count Unicode code points after NFKC normalization. */
export const PASSWORD_POLICY = Object.freeze({ minLength: 12, maxLength: 256 });

/**
 * NIST SP 800-63B section 5.1.1.2: passwords are Unicode; normalize (NFKC) before hashing so that
 * the same password typed on two keyboards hashes alike.
 */
function normalize(password: string): string {
  return password.normalize('NFKC');
}

/** The PHC prefix of a hash made with the current parameters. */
const CURRENT_PREFIX = `$argon2id$v=19$m=${ARGON2_PARAMS.memoryCost},t=${ARGON2_PARAMS.timeCost},p=${ARGON2_PARAMS.parallelism}$`;

/** `Algorithm.Argon2id`: a const enum, which verbatimModuleSyntax cannot import as a value. */
const ARGON2ID = 2 as Algorithm;

/** Argon2id PHC string of `password` (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`). */
export async function hashPassword(
  password: string,
  params: { memoryCost: number; timeCost: number; parallelism: number } = ARGON2_PARAMS,
): Promise<string> {
  return hash(normalize(password), { algorithm: ARGON2ID, ...params });
}

/** True when `password` matches the PHC string `phc`. Runs on the libuv thread pool, off the event loop. */
export async function verifyPassword(phc: string, password: string): Promise<boolean> {
  try {
    return await verify(phc, normalize(password));
  } catch {
    return false; // a malformed stored hash matches nothing
  }
}

/** True when `phc` was made with other parameters than {@link ARGON2_PARAMS} (rehash on next login). */
export function needsRehash(phc: string): boolean {
  return !phc.startsWith(CURRENT_PREFIX);
}

let dummy: Promise<string> | undefined;
/**
 * A hash of a random password at the current cost, verified against when the email is unknown or
 * the account cannot log in, so that a refusal takes as long whatever its reason (no user
 * enumeration by timing).
 */
export function dummyHash(): Promise<string> {
  dummy ??= hashPassword(randomBytes(18).toString('base64url'));
  return dummy;
}

/**
 * Refuses a password that breaks the policy, with `PASSWORD_POLICY` naming the rule (never the
 * password): at least 12 and at most 256 characters, not the account's email (nor its part before
 * the @), not one character repeated, not on the bundled list of common passwords. NIST SP 800-63B
 * asks for no composition rules (digits, symbols), so there are none.
 */
export function assertPasswordPolicy(password: unknown, email: string): asserts password is string {
  const fail = (diagnostics: string): never => {
    throw new CustosError('PASSWORD_POLICY', [{ severity: 'error', code: 'value', diagnostics }]);
  };
  if (typeof password !== 'string') return fail('A password is required.');
  const p = normalize(password);
  const length = [...p].length;
  if (length < PASSWORD_POLICY.minLength)
    fail(`The password must be at least ${PASSWORD_POLICY.minLength} characters long.`);
  if (length > PASSWORD_POLICY.maxLength)
    fail(`The password must be at most ${PASSWORD_POLICY.maxLength} characters long.`);
  const lower = p.toLowerCase();
  const mail = email.toLowerCase();
  const local = mail.split('@')[0] ?? '';
  if (lower === mail || lower === local) fail('The password must not be the email address.');
  if (new Set(p).size === 1) fail('The password must not be one character repeated.');
  if (isCommonPassword(lower)) fail('The password is on the list of common passwords.');
}
