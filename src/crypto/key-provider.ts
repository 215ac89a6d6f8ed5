/**
 * The key provider port (DESIGN.md: crypto). Key-encryption keys (KEKs) exist only inside the
 * provider: a local keyring file sealed under a passphrase-derived key, a PKCS#11 HSM, or a cloud
 * KMS. Custos hands the provider a freshly generated data key and gets it back wrapped; the
 * resource database may hold wrapped data keys, never a KEK (DESIGN.md rule 5).
 *
 * Every implementation must:
 * - bind `aad` (project, key epoch, purpose) into the wrap, so a wrapped key moved to another
 *   project or epoch fails to unwrap (AEAD, or an HSM mechanism with the AAD folded into the
 *   wrapped blob's integrity);
 * - fail with KeyProviderError naming the problem (unreachable, unknown key, destroyed key,
 *   integrity failure) and never include key material or plaintext in messages;
 * - make `destroyKek` irreversible: afterwards `unwrap` of anything wrapped under that KEK fails
 *   with code 'destroyed' or 'unknown_key' (crypto-shredding).
 */
export interface KeyProvider {
  readonly kind: 'local' | 'pkcs11' | 'aws-kms';
  /** Creates a new KEK for `keyId` (one per project and epoch); returns its provider handle. */
  createKek(keyId: string): Promise<string>;
  /** Wraps a 32-byte data key under the KEK `handle`. */
  wrap(handle: string, dataKey: Buffer, aad: Buffer): Promise<Buffer>;
  /** Unwraps what `wrap` produced; fails if the KEK, the blob or the AAD differ. */
  unwrap(handle: string, wrapped: Buffer, aad: Buffer): Promise<Buffer>;
  /** Destroys the KEK irreversibly. */
  destroyKek(handle: string): Promise<void>;
  close(): Promise<void>;
}

export type KeyProviderErrorCode =
  'unavailable' | 'unknown_key' | 'destroyed' | 'integrity' | 'bad_passphrase' | 'misconfigured';

/** A provider failure; `message` is fixed text chosen by us (no key material, no plaintext). */
export class KeyProviderError extends Error {
  constructor(
    readonly code: KeyProviderErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'KeyProviderError';
  }
}
