import fs from 'node:fs';
import path from 'node:path';
import { CustosError } from './errors.ts';

/** JWK members that only a private or symmetric key has (RFC 7518 section 6; `priv` for AKP keys). */
export const PRIVATE_JWK_MEMBERS: readonly string[] = ['d', 'p', 'q', 'dp', 'dq', 'qi', 'oth', 'k', 'priv'];

/**
 * Reads a secret file, creating it with `create()` (mode 0600, in a 0700 directory) when missing.
 * Keys live in files next to, never inside, the database they protect (DESIGN.md rule 5).
 *
 * Creation uses O_EXCL (`wx`), so two processes starting together agree on one key. A key file that
 * others can read is refused, as ssh refuses a private key with loose permissions.
 */
export function readOrCreateKeyFile(file: string, create: () => string): string {
  if (!fs.existsSync(file)) {
    fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
    try {
      fs.writeFileSync(file, create(), { mode: 0o600, flag: 'wx' });
    } catch (e) {
      if ((e as { code?: unknown }).code !== 'EEXIST') throw e;
    }
  }
  if (process.platform !== 'win32' && (fs.statSync(file).mode & 0o077) !== 0) {
    throw new CustosError('CONFIG_INVALID', [
      {
        severity: 'error',
        code: 'security',
        diagnostics: 'A key file is readable by group or others: chmod 600 it.',
      },
    ]);
  }
  return fs.readFileSync(file, 'utf8');
}
