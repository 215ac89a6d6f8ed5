import { generateKeyPairSync } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { readOrCreateKeyFile } from '../kernel/key-file.ts';
import type { AuditLog } from './audit-log.ts';
import { HASH_SIZE, inclusionProof, MerkleAccumulator, treeHead, verifyInclusion } from './merkle-proof.ts';
import {
  formatCheckpoint,
  formatVerifierKey,
  keyId,
  parseCheckpoint,
  parseSignerKey,
  signNote,
  verifyNote,
  type SignerKey,
} from './signed-note.ts';

/** A signed tree head as `custos audit checkpoint` prints it. */
export interface SignedCheckpoint {
  origin: string;
  treeSize: number;
  /** Hex. */
  rootHash: string;
  /** The C2SP signed note (checkpoint body plus signature line). */
  note: string;
  /** The verifier key anyone can check the note with. */
  verifierKey: string;
}

/** An RFC 9162 inclusion proof of one audit entry in a signed checkpoint. */
export interface InclusionProof {
  seq: number;
  treeSize: number;
  /** Hex leaf hash: SHA-256(0x00 || entry bytes). */
  leafHash: string;
  /** Hex node hashes, leaf to root. */
  proof: string[];
  rootHash: string;
  checkpoint: string;
  verifierKey: string;
}

export interface CheckpointReport {
  checked: number;
  /** Of those, how many came from the external checkpoint directory. */
  external: number;
  /** Tree size of the first checkpoint whose signature or root does not match the log. */
  firstBadTreeSize: number | undefined;
}

/**
 * Signed checkpoints of the audit log (C2SP tlog-checkpoint, Ed25519 signed notes) and inclusion
 * proofs against them. The signing key lives in a key file beside, never inside, the audit and
 * resource databases. Proofs and heads are computed from the stored leaf hashes; storing interior
 * hashes (C2SP tlog-tiles) so that a proof costs O(log n) reads is the audit issue's next step.
 */
export class Checkpoints {
  private signerKey: SignerKey | undefined;
  private readonly accumulator = new MerkleAccumulator();
  private accumulatedSize = 0;

  constructor(
    private readonly opts: {
      audit: AuditLog;
      keyFile: string;
      origin: string;
      /** Every signed checkpoint is also written here (outside both databases), so that a
       * truncated log and truncated checkpoint table are still caught by verify. */
      exportDir?: string;
    },
  ) {}

  private signer(): SignerKey {
    this.signerKey ??= parseSignerKey(
      readOrCreateKeyFile(this.opts.keyFile, () => newSignerKey(this.opts.origin)).trim(),
    );
    return this.signerKey;
  }

  verifierKey(): string {
    const s = this.signer();
    return formatVerifierKey(s.name, s.publicKeyRaw);
  }

  /** Signs the current tree head and stores it (idempotent for an unchanged size). */
  async checkpoint(): Promise<SignedCheckpoint> {
    const audit = this.opts.audit;
    const size = await audit.size();
    const root = await this.headAt(size);
    const s = this.signer();
    const note = signNote(formatCheckpoint(this.opts.origin, size, root), s.name, s.privateKey);
    await audit.database.query(
      'INSERT INTO audit_checkpoint (tree_size, root_hash, note) VALUES ($1, $2, $3) ON CONFLICT (tree_size) DO NOTHING',
      [size, root, note],
    );
    if (this.opts.exportDir) {
      fs.mkdirSync(this.opts.exportDir, { recursive: true });
      try {
        fs.writeFileSync(
          path.join(this.opts.exportDir, `checkpoint-${String(size).padStart(12, '0')}.note`),
          note,
          { flag: 'wx' },
        );
      } catch (e) {
        if ((e as { code?: unknown }).code !== 'EEXIST') throw e;
      }
    }
    const stored = await this.at(size);
    return (
      stored ?? {
        origin: this.opts.origin,
        treeSize: size,
        rootHash: root.toString('hex'),
        note,
        verifierKey: this.verifierKey(),
      }
    );
  }

  /**
   * The tree head at `size`, reading only the leaves added since the last call: the accumulator
   * keeps the perfect-subtree roots it has seen, so a checkpoint every minute costs O(new entries).
   */
  private async headAt(size: number): Promise<Buffer> {
    if (size < this.accumulatedSize) return treeHead(this.opts.audit, size);
    for (let at = this.accumulatedSize; at < size;) {
      const end = Math.min(size, at + 4096);
      const leaves = await this.opts.audit.leafHashes(at, end);
      if (leaves.length !== end - at) throw new Error('audit log has a gap: no checkpoint signed');
      for (const leaf of leaves) this.accumulator.add(leaf);
      at = end;
    }
    this.accumulatedSize = size;
    return this.accumulator.root();
  }

  private async at(size: number): Promise<SignedCheckpoint | undefined> {
    const r = await this.opts.audit.database.query<{ note: string }>(
      'SELECT note FROM audit_checkpoint WHERE tree_size = $1',
      [size],
    );
    const note = r.rows[0]?.note;
    if (!note) return undefined;
    const cp = parseCheckpoint(verifyNote(note, [this.verifierKey()]).text);
    return {
      origin: cp.origin,
      treeSize: cp.size,
      rootHash: cp.rootHash.toString('hex'),
      note,
      verifierKey: this.verifierKey(),
    };
  }

  /** Inclusion proof of entry `seq` in the newest checkpoint that covers it (signing one if none does). */
  async prove(seq: number): Promise<InclusionProof | undefined> {
    const audit = this.opts.audit;
    if (!Number.isSafeInteger(seq) || seq < 0 || seq >= (await audit.size())) return undefined;
    const r = await audit.database.query<{ tree_size: number }>(
      'SELECT max(tree_size) AS tree_size FROM audit_checkpoint WHERE tree_size > $1',
      [seq],
    );
    const covering = r.rows[0]?.tree_size;
    const cp = covering ? await this.at(Number(covering)) : await this.checkpoint();
    if (!cp) return undefined;
    const [leaf] = await audit.leafHashes(seq, seq + 1);
    const proof = await inclusionProof(audit, seq, cp.treeSize);
    const root = Buffer.from(cp.rootHash, 'hex');
    // Never hand out a proof that does not verify: that would mean the log changed under the checkpoint.
    if (!leaf || !verifyInclusion(seq, cp.treeSize, leaf, proof, root)) {
      throw new Error('inclusion proof does not verify against the signed checkpoint');
    }
    return {
      seq,
      treeSize: cp.treeSize,
      leafHash: leaf.toString('hex'),
      proof: proof.map((h) => h.toString('hex')),
      rootHash: cp.rootHash,
      checkpoint: cp.note,
      verifierKey: cp.verifierKey,
    };
  }

  /**
   * Every checkpoint, stored and exported: its signature verifies and its root is the tree head of
   * the log now at its size. A checkpoint larger than the log means the log was truncated.
   */
  async verifyAll(): Promise<CheckpointReport> {
    const audit = this.opts.audit;
    const rows = await audit.database.query<{ tree_size: number; note: string }>(
      'SELECT tree_size, note FROM audit_checkpoint ORDER BY tree_size',
    );
    const external = this.exported();
    const all = [
      ...rows.rows.map((r) => ({ treeSize: Number(r.tree_size), note: r.note })),
      ...external,
    ].sort((a, b) => a.treeSize - b.treeSize);
    const size = await audit.size();
    const vkey = this.verifierKey();
    for (const row of all) {
      const treeSize = row.treeSize;
      try {
        const cp = parseCheckpoint(verifyNote(row.note, [vkey]).text);
        if (cp.size !== treeSize || cp.size > size || cp.rootHash.length !== HASH_SIZE)
          throw new Error('size');
        if (!(await treeHead(audit, cp.size)).equals(cp.rootHash)) throw new Error('root');
      } catch {
        return { checked: all.length, external: external.length, firstBadTreeSize: treeSize };
      }
    }
    return { checked: all.length, external: external.length, firstBadTreeSize: undefined };
  }

  /** Checkpoints in the export directory (size from the file name; the note is checked by verifyAll). */
  private exported(): { treeSize: number; note: string }[] {
    const dir = this.opts.exportDir;
    if (!dir || !fs.existsSync(dir)) return [];
    return fs
      .readdirSync(dir)
      .map((f) => /^checkpoint-(\d{12})\.note$/.exec(f))
      .filter((m): m is RegExpExecArray => m !== null)
      .map((m) => ({ treeSize: Number(m[1]), note: fs.readFileSync(path.join(dir, m[0]), 'utf8') }));
  }
}

/** A Go-style signer key (`PRIVATE+KEY+name+keyid+base64(0x01||seed)`) for a fresh Ed25519 key. */
function newSignerKey(name: string): string {
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  const seed = privateKey.export({ format: 'der', type: 'pkcs8' }).subarray(-32);
  const pub = publicKey.export({ format: 'der', type: 'spki' }).subarray(-32);
  const enc = Buffer.concat([Buffer.from([1]), seed]).toString('base64');
  return `PRIVATE+KEY+${name}+${keyId(name, pub).toString('hex')}+${enc}\n`;
}
