import { generateKeyPairSync } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { CustosError } from '../kernel/errors.ts';
import { readOrCreateKeyFile } from '../kernel/key-file.ts';
import type { AuditLog } from './audit-log.ts';
import {
  consistencyRanges,
  HASH_SIZE,
  inclusionRanges,
  rangeHashes,
  treeHead,
  verifyConsistency,
  verifyInclusion,
} from './merkle-proof.ts';
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
import { Tiles } from './tiles.ts';

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

/** A tree head in a consistency proof: signed when a checkpoint of that size was stored. */
export interface TreeHead {
  treeSize: number;
  /** Hex. */
  rootHash: string;
  /** The signed checkpoint note of this size, if one was signed. */
  checkpoint?: string;
}

/** An RFC 9162 consistency proof: the log of size `to` extends the log of size `from`. */
export interface ConsistencyProof {
  from: TreeHead;
  to: TreeHead;
  /** Hex node hashes (RFC 9162 §2.1.4 order); empty when the sizes are equal. */
  proof: string[];
  verifierKey: string;
}

export interface CheckpointReport {
  checked: number;
  /** Of those, how many came from the external checkpoint directory. */
  external: number;
  /** Tree size of the first checkpoint whose signature or root does not match the log. */
  firstBadTreeSize: number | undefined;
}

/** A checkpoint as stored (database) or exported (directory), before it is checked. */
export interface StoredCheckpoint {
  treeSize: number;
  note: string;
  external: boolean;
}

function badRequest(diagnostics: string): CustosError {
  return new CustosError('BAD_REQUEST', [{ severity: 'error', code: 'value', diagnostics }]);
}

/**
 * Signed checkpoints of the audit log (C2SP tlog-checkpoint, Ed25519 signed notes), and inclusion
 * and consistency proofs against them. The signing key lives in a key file beside, never inside, the
 * audit and resource databases. Tree heads and proofs come from the stored tiles (tiles.ts, C2SP
 * tlog-tiles), which each checkpoint extends: O(log n) reads. Every proof is checked against the
 * signed root before it is handed out.
 */
export class Checkpoints {
  private signerKey: SignerKey | undefined;
  /** The tiles of the log's Merkle tree, written as checkpoints are signed. */
  readonly tiles: Tiles;

  constructor(
    private readonly opts: {
      audit: AuditLog;
      keyFile: string;
      origin: string;
      /** Every signed checkpoint is also written here (outside both databases), so that a
       * truncated log and truncated checkpoint table are still caught by verify. */
      exportDir?: string;
    },
  ) {
    this.tiles = new Tiles(opts.audit.database, opts.audit);
  }

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

  /**
   * Signs the current tree head and stores it (idempotent for an unchanged size). First stores the
   * tiles the log has completed since the last one, so the head and later proofs read tiles.
   */
  async checkpoint(): Promise<SignedCheckpoint> {
    const audit = this.opts.audit;
    const size = await audit.size();
    await this.extendTiles(size);
    const root = await treeHead(this.tiles.source(), size);
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
   * Stores the tiles a tree of `size` leaves completes. A role without INSERT on audit_tile (a grant
   * not given yet) still signs and proves: tiles are a shortcut, and what is not stored is computed
   * from the leaf hashes.
   */
  private async extendTiles(size: number): Promise<void> {
    await this.tiles.extend(size).catch((e: unknown) => {
      if ((e as { code?: unknown }).code !== '42501') throw e;
    });
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

  /** The newest stored signed checkpoint (the largest tree size), if any: what witnesses are sent. */
  async latest(): Promise<SignedCheckpoint | undefined> {
    const r = await this.opts.audit.database.query<{ tree_size: number | null }>(
      'SELECT max(tree_size) AS tree_size FROM audit_checkpoint',
    );
    const size = r.rows[0]?.tree_size;
    return size === null || size === undefined ? undefined : this.at(Number(size));
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
    await this.extendTiles(cp.treeSize);
    // The leaf hash (from its level-0 tile) and the proof in one read of the tiles.
    const [leaf, ...proof] = await rangeHashes(this.tiles.source(), [
      [seq, seq + 1],
      ...inclusionRanges(seq, cp.treeSize),
    ]);
    const root = Buffer.from(cp.rootHash, 'hex');
    // Never hand out a proof that does not verify: that would mean the log or its tiles changed
    // under the checkpoint (custos audit verify says which).
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
   * RFC 9162 consistency proof from tree size `from` to tree size `to` (default: the log's current
   * size, for which a checkpoint is signed). Each head carries its signed checkpoint when one of that
   * size was stored. Throws BAD_REQUEST for sizes that are not whole numbers, `from` of 0
   * (consistency with the empty tree is not defined), `from > to`, or sizes beyond the log.
   */
  async consistency(from: unknown, to?: unknown): Promise<ConsistencyProof> {
    const whole = (v: unknown) => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
    if (!whole(from)) throw badRequest('from must be a tree size: a whole number of at least 1');
    if (to !== undefined && !whole(to))
      throw badRequest('to must be a tree size: a whole number of at least 1');
    const size = await this.opts.audit.size();
    const oldSize = from as number;
    const newSize = to === undefined ? (await this.checkpoint()).treeSize : (to as number);
    if (oldSize === 0)
      throw badRequest('from must be at least 1: no consistency proof starts at the empty tree');
    if (oldSize > newSize) throw badRequest(`from (${oldSize}) is larger than to (${newSize})`);
    if (newSize > size) throw badRequest(`to (${newSize}) is beyond the log (${size} entries)`);
    await this.extendTiles(newSize);
    const src = this.tiles.source();
    // Both heads and the proof in one read of the tiles.
    const [root1, root2, ...proof] = await rangeHashes(src, [
      [0, oldSize],
      [0, newSize],
      ...consistencyRanges(oldSize, newSize),
    ]);
    if (!root1 || !root2) throw new Error('no tree head');
    const head = async (treeSize: number, root: Buffer): Promise<TreeHead> => {
      const cp = await this.at(treeSize);
      if (cp && cp.rootHash !== root.toString('hex')) {
        throw new Error(`the signed checkpoint of tree size ${treeSize} does not match the log`);
      }
      return { treeSize, rootHash: root.toString('hex'), ...(cp ? { checkpoint: cp.note } : {}) };
    };
    const result = {
      from: await head(oldSize, root1),
      to: await head(newSize, root2),
      proof: proof.map((h) => h.toString('hex')),
      verifierKey: this.verifierKey(),
    };
    if (!verifyConsistency(oldSize, newSize, proof, root1, root2)) {
      throw new Error('consistency proof does not verify');
    }
    return result;
  }

  /** Every checkpoint, stored and exported, unchecked, in tree-size order. */
  async list(): Promise<StoredCheckpoint[]> {
    const rows = await this.opts.audit.database.query<{ tree_size: number; note: string }>(
      'SELECT tree_size, note FROM audit_checkpoint ORDER BY tree_size',
    );
    return [
      ...rows.rows.map((r) => ({ treeSize: Number(r.tree_size), note: r.note, external: false })),
      ...this.exported(),
    ].sort((a, b) => a.treeSize - b.treeSize);
  }

  /**
   * Every checkpoint (default: {@link list}): its signature verifies and its root is the tree head of
   * the log at its size. `heads` are those heads as verify recomputed them from the entries, and
   * `logSize` the entries it read; without them the heads are computed from the stored leaf hashes.
   * A checkpoint larger than the log means the log was truncated.
   */
  async verifyAll(
    checkpoints?: readonly StoredCheckpoint[],
    heads?: ReadonlyMap<number, Buffer>,
    logSize?: number,
  ): Promise<CheckpointReport> {
    const audit = this.opts.audit;
    const all = checkpoints ?? (await this.list());
    const size = logSize ?? (await audit.size());
    const external = all.filter((c) => c.external).length;
    const vkey = this.verifierKey();
    for (const row of all) {
      const treeSize = row.treeSize;
      try {
        const cp = parseCheckpoint(verifyNote(row.note, [vkey]).text);
        if (cp.size !== treeSize || cp.size > size || cp.rootHash.length !== HASH_SIZE)
          throw new Error('size');
        const head = heads ? heads.get(cp.size) : await treeHead(audit, cp.size);
        if (!head?.equals(cp.rootHash)) throw new Error('root');
      } catch {
        return { checked: all.length, external, firstBadTreeSize: treeSize };
      }
    }
    return { checked: all.length, external, firstBadTreeSize: undefined };
  }

  /** Checkpoints in the export directory (size from the file name; the note is checked by verifyAll). */
  private exported(): StoredCheckpoint[] {
    const dir = this.opts.exportDir;
    if (!dir || !fs.existsSync(dir)) return [];
    return fs
      .readdirSync(dir)
      .map((f) => /^checkpoint-(\d{12})\.note$/.exec(f))
      .filter((m): m is RegExpExecArray => m !== null)
      .map((m) => ({
        treeSize: Number(m[1]),
        note: fs.readFileSync(path.join(dir, m[0]), 'utf8'),
        external: true,
      }));
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
