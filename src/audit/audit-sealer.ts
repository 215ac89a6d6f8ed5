import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { CustosError } from '../kernel/errors.ts';
import { readOrCreateKeyFile } from '../kernel/key-file.ts';
import { freshNonce } from '../kernel/nonce.ts';
import { canonicalJson } from './audit-event.ts';

/**
 * What an auditor needs to see that could hold PHI. These are never written to the audit log in
 * clear: {@link AuditSealer.seal} turns them into an event's `sealed` field.
 */
export interface SensitiveFields {
  /** The query string of a search (URL and form parameters), as the server parsed it. */
  query?: string;
  /** `X-Break-Glass-Reason` of a break-glass request. */
  breakGlassReason?: string;
  /** The caller's `User-Agent`. */
  userAgent?: string;
  /** Fields cut to their limit before sealing (names of the fields). */
  truncated?: string[];
}

/** Longest value kept per field, in UTF-16 code units; longer ones are cut and listed in `truncated`. */
export const SEALED_FIELD_LIMITS = { query: 16_384, breakGlassReason: 2_048, userAgent: 512 } as const;

const FORMAT = 'v1';
const NONCE_BYTES = 12;
const TAG_BYTES = 16;

/**
 * Seals the PHI-bearing fields of audit events (docs/audit.md, "Sealed fields"): AES-256-GCM
 * (node:crypto) with a fresh random 96-bit nonce per event (from a pooled CSPRNG block) and the event
 * id as associated data, so a sealed value cannot be moved to another event. The result is
 * `v1.<nonce>.<ciphertext‖tag>`, base64url. The plaintext is the canonical JSON of the fields.
 *
 * The key is 32 random bytes in `<data dir>/keys/audit-field.key` (mode 0600), outside both
 * databases (DESIGN.md rule 5). A key provider (HSM, KMS) for this key, and its rotation, arrive
 * later; the `v1` prefix names this format and key so that a later one can be told apart.
 *
 * @example
 * const sealer = AuditSealer.fromKeyFile('.custos/keys/audit-field.key');
 * const sealed = sealer.seal(event.id, { query: 'name=Smith' }); // 'v1.…'
 * sealer.open(event.id, sealed); // { query: 'name=Smith' }
 */
export class AuditSealer {
  private constructor(private readonly key: Buffer) {}

  /** Reads the key file, creating it (0600, in a 0700 directory) on first use. */
  static fromKeyFile(file: string): AuditSealer {
    const text = readOrCreateKeyFile(file, () => `${randomBytes(32).toString('base64url')}\n`);
    return AuditSealer.fromKey(Buffer.from(text.trim(), 'base64url'));
  }

  static fromKey(key: Buffer): AuditSealer {
    if (key.length !== 32)
      throw new CustosError('CONFIG_INVALID', [
        { severity: 'error', code: 'security', diagnostics: 'The audit field key must be 32 bytes.' },
      ]);
    return new AuditSealer(Buffer.from(key));
  }

  /** The sealed form of `fields` for event `eventId`, or undefined when there is nothing to seal. */
  seal(eventId: string, fields: SensitiveFields): string | undefined {
    const kept: SensitiveFields = {};
    const truncated: string[] = [];
    for (const name of ['query', 'breakGlassReason', 'userAgent'] as const) {
      const v = fields[name];
      if (typeof v !== 'string' || v === '') continue;
      const limit = SEALED_FIELD_LIMITS[name];
      if (v.length > limit) truncated.push(name);
      kept[name] = v.length > limit ? v.slice(0, limit) : v;
    }
    if (Object.keys(kept).length === 0) return undefined;
    if (truncated.length > 0) kept.truncated = truncated;
    // A view of the shared nonce block, consumed before this function returns (src/kernel/nonce.ts).
    const nonce = freshNonce();
    const cipher = createCipheriv('aes-256-gcm', this.key, nonce);
    cipher.setAAD(Buffer.from(eventId, 'utf8'));
    const ct = Buffer.concat([
      cipher.update(canonicalJson(kept), 'utf8'),
      cipher.final(),
      cipher.getAuthTag(),
    ]);
    return `${FORMAT}.${nonce.toString('base64url')}.${ct.toString('base64url')}`;
  }

  /**
   * Opens a sealed value of event `eventId`. Throws SEALED_DATA_INVALID when it is not ours, was
   * changed, or belongs to another event.
   */
  open(eventId: string, sealed: string): SensitiveFields {
    const parts = sealed.split('.');
    if (parts.length !== 3 || parts[0] !== FORMAT) throw new CustosError('SEALED_DATA_INVALID');
    const nonce = Buffer.from(parts[1]!, 'base64url');
    const body = Buffer.from(parts[2]!, 'base64url');
    if (nonce.length !== NONCE_BYTES || body.length < TAG_BYTES) throw new CustosError('SEALED_DATA_INVALID');
    try {
      const decipher = createDecipheriv('aes-256-gcm', this.key, nonce, { authTagLength: TAG_BYTES });
      decipher.setAAD(Buffer.from(eventId, 'utf8'));
      decipher.setAuthTag(body.subarray(body.length - TAG_BYTES));
      const plain = Buffer.concat([
        decipher.update(body.subarray(0, body.length - TAG_BYTES)),
        decipher.final(),
      ]);
      const v = JSON.parse(plain.toString('utf8')) as Record<string, unknown>;
      const out: SensitiveFields = {};
      for (const name of ['query', 'breakGlassReason', 'userAgent'] as const)
        if (typeof v[name] === 'string') out[name] = v[name];
      if (Array.isArray(v.truncated)) out.truncated = v.truncated.filter((x) => typeof x === 'string');
      return out;
    } catch {
      throw new CustosError('SEALED_DATA_INVALID');
    }
  }
}
