import { randomFillSync } from 'node:crypto';

/**
 * 96-bit AES-GCM nonces, read from node's CSPRNG in blocks of 4 KiB (`randomFillSync`) instead of one
 * `randomBytes(12)` call each (2–5 µs a call on this project's VMs, and about 20 µs inside a busy
 * server, against 0.1–0.4 µs). Nonces are public (they are stored beside the ciphertext); what matters
 * is that each is fresh random and used once: each slice of the block is handed out once, and the block
 * is refilled before any byte is handed out again. Shared by the field envelope (src/crypto/envelope.ts)
 * and the audit sealer (src/audit/audit-sealer.ts).
 *
 * The result is a view of the block: use it (or copy it) before the next call, synchronously.
 */
const NONCE_BLOCK = Buffer.alloc(12 * 341);
let nonceAt = NONCE_BLOCK.length;

export function freshNonce(): Buffer {
  if (nonceAt + 12 > NONCE_BLOCK.length) {
    randomFillSync(NONCE_BLOCK);
    nonceAt = 0;
  }
  nonceAt += 12;
  return NONCE_BLOCK.subarray(nonceAt - 12, nonceAt);
}
