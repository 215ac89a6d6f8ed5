/**
 * The audit log's Merkle tree stored as C2SP tlog-tiles (https://c2sp.org/tlog-tiles), so that a tree
 * head, an inclusion proof or a consistency proof costs a few reads per 256-fold level of the tree,
 * O(log n), instead of reading every leaf hash.
 *
 * Layout (as in the spec): a tile at level L, index N holds 256 consecutive hashes of tree height 8L,
 * that is the hashes of the perfect subtrees of 256^L leaves numbered N·256 … N·256+255; level 0 holds
 * leaf hashes. A node of height 8L + r (r < 8) is the root of 2^r consecutive entries of one level-L
 * tile. Only full tiles are stored, in `audit_tile` (one row per tile: the 256 hashes concatenated,
 * 8,192 bytes, and their root, which is the matching entry of level L+1). A full tile never changes,
 * so the table is INSERT-only like `audit_entry`. The partial tile at the right edge of each level is
 * recomputed when needed: at level 0 from the ≤ 255 leaf hashes past the last full tile, at level
 * L ≥ 1 from the stored roots of the ≤ 255 full level-(L-1) tiles past the last full level-L tile.
 *
 * Tiles are derived data: verify (audit-verify.ts) recomputes them from the entries and reports any
 * stored tile that differs. Proofs made from tiles are checked against the signed root before they
 * are handed out (checkpoints.ts), so a tampered tile cannot yield a proof that verifies.
 *
 * Until the table exists (see {@link TILE_MIGRATION_SQL}), nothing is stored and every hash is
 * computed from the leaf hashes, as before tiles.
 * @module
 */
import type { SqlDriver } from '../store/sql-driver.ts';
import {
  foldRoots,
  HASH_SIZE,
  MerkleAccumulator,
  perfectRoot,
  type NodeHashSource,
  type PerfectNode,
} from './merkle-proof.ts';

/** Tree levels per tile (C2SP tlog-tiles: 8, so 256 hashes per tile). */
export const TILE_HEIGHT = 8;
export const TILE_WIDTH = 2 ** TILE_HEIGHT;
/** Bytes of a full tile: 256 hashes of 32 bytes. */
export const TILE_BYTES = TILE_WIDTH * HASH_SIZE;

/**
 * DDL of the tile table, for the audit database's migrations (a new version after the current last
 * one). Safe to run twice. Its own refusal trigger keeps it independent of the entry table's.
 */
export const TILE_MIGRATION_SQL = `
-- Full tiles (C2SP tlog-tiles) of the audit log's Merkle tree: 256 hashes of height 8*level each,
-- immutable once written, so INSERT-only. Derived data: custos audit verify recomputes every tile.
CREATE TABLE IF NOT EXISTS audit_tile (
  level smallint NOT NULL CHECK (level >= 0 AND level < 7),
  idx bigint NOT NULL CHECK (idx >= 0),
  hashes bytea NOT NULL CHECK (length(hashes) = 8192),
  root bytea NOT NULL CHECK (length(root) = 32),
  PRIMARY KEY (level, idx)
);
CREATE OR REPLACE FUNCTION audit_tile_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'audit tiles are append-only';
END;
$$;
DROP TRIGGER IF EXISTS audit_tile_no_update ON audit_tile;
CREATE TRIGGER audit_tile_no_update BEFORE UPDATE OR DELETE ON audit_tile
  FOR EACH ROW EXECUTE FUNCTION audit_tile_refuse_change();
DROP TRIGGER IF EXISTS audit_tile_no_truncate ON audit_tile;
CREATE TRIGGER audit_tile_no_truncate BEFORE TRUNCATE ON audit_tile
  FOR EACH STATEMENT EXECUTE FUNCTION audit_tile_refuse_change();
`;

/**
 * The C2SP tlog-tiles path of a tile: `tile/<L>/<N>` with N in groups of three digits, every group but
 * the last prefixed with `x`, and `.p/<W>` for a partial tile of width W < 256.
 */
export function tilePath(level: number, index: number, width = TILE_WIDTH): string {
  const digits = String(index).padStart(3 * Math.ceil(String(index).length / 3), '0');
  const groups = digits.match(/\d{3}/g)!;
  const n = groups.map((g, i) => (i < groups.length - 1 ? `x${g}` : g)).join('/');
  return `tile/${level}/${n}${width < TILE_WIDTH ? `.p/${width}` : ''}`;
}

/** What the tiles need from the log: its size and its stored leaf hashes (AuditLog has both). */
export interface LeafSource {
  size(): Promise<number>;
  /** Leaf hashes of [from, to), in order. */
  leafHashes(from: number, to: number): Promise<Buffer[]>;
}

/** One full tile. */
export interface Tile {
  level: number;
  index: number;
  /** 256 hashes, concatenated. */
  hashes: Buffer;
  /** Their root: the hash of the subtree the tile covers. */
  root: Buffer;
}

/**
 * Builds the tiles of a tree fed left to right, and its head at any point: per level, the entries not
 * yet in a full tile, with a stack of their perfect subtrees, so the head costs O(log n) hashes. Each
 * entry is hashed into its tile's root once, which is all the tree's interior hashes.
 */
export class TileBuilder {
  private readonly levels: { acc: MerkleAccumulator; entries: Buffer[]; tiles: number }[] = [];
  private leaves = 0;

  constructor(private readonly onTile: (tile: Tile) => void = () => {}) {}

  /** Leaves added so far. */
  get size(): number {
    return this.leaves;
  }

  private at(level: number) {
    return (this.levels[level] ??= { acc: new MerkleAccumulator(), entries: [], tiles: 0 });
  }

  /** Adds the next leaf hash. */
  addLeaf(leafHash: Buffer): void {
    this.leaves++;
    this.add(0, leafHash);
  }

  /** Adds the next 256 leaf hashes at once, with their root already computed (verify's workers). */
  addLeafTile(hashes: Buffer, root: Buffer): void {
    const l = this.at(0);
    if (l.entries.length !== 0 || hashes.length !== TILE_BYTES) throw new Error('leaf tile not aligned');
    this.leaves += TILE_WIDTH;
    this.complete(0, hashes, root);
  }

  private add(level: number, hash: Buffer): void {
    const l = this.at(level);
    l.entries.push(hash);
    l.acc.add(hash);
    if (l.entries.length === TILE_WIDTH) this.complete(level, Buffer.concat(l.entries), l.acc.roots()[0]!);
  }

  private complete(level: number, hashes: Buffer, root: Buffer): void {
    const l = this.at(level);
    l.entries = [];
    l.acc = new MerkleAccumulator();
    this.onTile({ level, index: l.tiles++, hashes, root });
    this.add(level + 1, root);
  }

  /** RFC 9162 head of the leaves added so far (SHA-256("") when none). */
  root(): Buffer {
    const roots: Buffer[] = [];
    for (let level = this.levels.length - 1; level >= 0; level--)
      roots.push(...this.levels[level]!.acc.roots());
    return foldRoots(roots);
  }
}

/** Full tiles written per INSERT while extending (64 tiles: 512 KiB of hashes). */
const INSERT_TILES = 64;
/** Computed tile roots kept in memory (32 bytes each; a million cover 256 million entries). */
const MAX_CACHED_ROOTS = 1_000_000;
/** Leaf hashes per SELECT when a range of them is read. */
const LEAF_PAGE = 16 * TILE_WIDTH * 4;

/**
 * The stored tiles of one audit database: written as the log grows ({@link Tiles.extend}), read by
 * proofs ({@link Tiles.source}) and by verify ({@link Tiles.stored}).
 */
export class Tiles {
  private present = false;
  /** Roots of full tiles computed here (not read from the table): "level/index" → hash. */
  private readonly roots = new Map<string, Buffer>();
  private chain: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly db: SqlDriver,
    private readonly leaves: LeafSource,
  ) {}

  /** Whether the tile table exists (once it does, that is remembered). */
  async available(): Promise<boolean> {
    if (this.present) return true;
    const r = await this.db.query<{ ok: boolean }>(`SELECT to_regclass('audit_tile') IS NOT NULL AS ok`);
    this.present = r.rows[0]?.ok === true;
    return this.present;
  }

  /** Full tiles stored per level: level → next index to write (tiles are written in order). */
  async storedCounts(): Promise<number[]> {
    if (!(await this.available())) return [];
    const r = await this.db.query<{ level: number; next: number | null }>(
      `SELECT l AS level, (SELECT max(idx) + 1 FROM audit_tile WHERE level = l) AS next
       FROM generate_series(0, 6) AS l ORDER BY l`,
    );
    const counts: number[] = [];
    for (const row of r.rows) {
      if (row.next === null) break;
      counts[Number(row.level)] = Number(row.next);
    }
    return counts;
  }

  /**
   * Stores every full tile of the tree of `size` leaves (default: the log's size) not stored yet,
   * level by level from the leaf hashes and the roots of the level below. Returns how many it wrote.
   * Calls are serialized; several processes may extend at once (a tile already there is kept).
   */
  extend(size?: number): Promise<number> {
    const run = this.chain.then(() => this.extendNow(size));
    this.chain = run.catch(() => {});
    return run;
  }

  private async extendNow(size: number | undefined): Promise<number> {
    if (!(await this.available())) return 0;
    const n = size ?? (await this.leaves.size());
    const counts = await this.storedCounts();
    let written = 0;
    for (let level = 0; ; level++) {
      const target = Math.floor(n / TILE_WIDTH ** (level + 1));
      if (target === 0) break;
      for (let next = counts[level] ?? 0; next < target;) {
        const end = Math.min(target, next + INSERT_TILES);
        const entries = await this.entries(level, next * TILE_WIDTH, end * TILE_WIDTH);
        const idx: number[] = [];
        const hashes: Buffer[] = [];
        const roots: Buffer[] = [];
        for (let t = next; t < end; t++) {
          const h = entries.subarray((t - next) * TILE_BYTES, (t - next + 1) * TILE_BYTES);
          idx.push(t);
          hashes.push(h);
          roots.push(perfectRoot(h, TILE_WIDTH));
        }
        await this.db.query(
          `INSERT INTO audit_tile (level, idx, hashes, root)
           SELECT $1::smallint, * FROM unnest($2::bigint[], $3::bytea[], $4::bytea[])
           ON CONFLICT (level, idx) DO NOTHING`,
          [level, idx, hashes, roots],
        );
        written += end - next;
        next = end;
      }
    }
    return written;
  }

  /**
   * The entries [from, to) of tree level `level` (hashes of height 8·level), concatenated: leaf hashes
   * at level 0; above, the roots of the full tiles of the level below, computed where not stored.
   */
  private async entries(level: number, from: number, to: number): Promise<Buffer> {
    if (to <= from) return Buffer.alloc(0);
    if (level === 0) {
      const parts: Buffer[] = [];
      for (let at = from; at < to;) {
        const end = Math.min(to, at + LEAF_PAGE);
        const got = await this.leaves.leafHashes(at, end);
        if (got.length !== end - at || !got.every((h) => h.length === HASH_SIZE)) {
          throw new Error(`the audit log has no leaf hashes for [${at}, ${end}): a gap`);
        }
        parts.push(...got);
        at = end;
      }
      return Buffer.concat(parts);
    }
    const out = Buffer.alloc((to - from) * HASH_SIZE);
    const have = new Uint8Array(to - from);
    if (await this.available()) {
      const r = await this.db.query<{ idx: number; root: Uint8Array }>(
        'SELECT idx, root FROM audit_tile WHERE level = $1 AND idx >= $2 AND idx < $3',
        [level - 1, from, to],
      );
      for (const row of r.rows) {
        const i = Number(row.idx) - from;
        Buffer.from(row.root).copy(out, i * HASH_SIZE);
        have[i] = 1;
      }
    }
    // Roots not stored: from this process's cache (a full tile's root never changes), else computed
    // from the tiles below, a run of consecutive ones at a time. Without the tile table, the cache
    // keeps checkpoints incremental: each root is computed once.
    for (let i = 0; i < to - from; i++) {
      const cached = this.roots.get(`${level - 1}/${from + i}`);
      if (!have[i] && cached) {
        cached.copy(out, i * HASH_SIZE);
        have[i] = 1;
      }
    }
    for (let i = 0; i < to - from;) {
      if (have[i]) {
        i++;
        continue;
      }
      let j = i;
      while (j < to - from && !have[j] && j - i < TILE_WIDTH) j++;
      const below = await this.entries(level - 1, (from + i) * TILE_WIDTH, (from + j) * TILE_WIDTH);
      for (let k = i; k < j; k++) {
        const root = perfectRoot(below, TILE_WIDTH, (k - i) * TILE_BYTES);
        root.copy(out, k * HASH_SIZE);
        if (this.roots.size < MAX_CACHED_ROOTS) this.roots.set(`${level - 1}/${from + k}`, root);
      }
      i = j;
    }
    return out;
  }

  /**
   * The first `count` entries of tile (level, index) for each request: stored full tiles in one query,
   * the others (the partial right edge, or tiles not written yet) computed by {@link entries}.
   */
  private async tileEntries(
    wanted: readonly { level: number; index: number; count: number }[],
  ): Promise<Map<string, Buffer>> {
    const out = new Map<string, Buffer>();
    if (wanted.length > 0 && (await this.available())) {
      const r = await this.db.query<{ level: number; idx: number; hashes: Uint8Array }>(
        `SELECT level, idx, hashes FROM audit_tile
         WHERE (level, idx) IN (SELECT * FROM unnest($1::smallint[], $2::bigint[]))`,
        [wanted.map((w) => w.level), wanted.map((w) => w.index)],
      );
      for (const row of r.rows) out.set(`${row.level}/${row.idx}`, Buffer.from(row.hashes));
    }
    for (const w of wanted) {
      const key = `${w.level}/${w.index}`;
      if (!out.has(key)) {
        out.set(key, await this.entries(w.level, w.index * TILE_WIDTH, w.index * TILE_WIDTH + w.count));
      }
    }
    return out;
  }

  /**
   * Hashes of perfect subtrees from the tiles: node (h, i) with h = 8L + r is the root of entries
   * [i·2^r, (i+1)·2^r) of level L, all in one tile. One query for the stored tiles a request touches,
   * plus at most one per level for the partial right edge: O(log n) reads for a proof.
   */
  async nodeHashes(nodes: readonly PerfectNode[]): Promise<Buffer[]> {
    const wanted = new Map<string, { level: number; index: number; count: number }>();
    const plan = nodes.map(({ height, index }) => {
      const level = Math.floor(height / TILE_HEIGHT);
      const width = 2 ** (height - level * TILE_HEIGHT);
      const first = index * width;
      const tile = Math.floor(first / TILE_WIDTH);
      const offset = first - tile * TILE_WIDTH;
      const key = `${level}/${tile}`;
      const w = wanted.get(key) ?? { level, index: tile, count: 0 };
      w.count = Math.max(w.count, offset + width);
      wanted.set(key, w);
      return { key, offset, width };
    });
    const tiles = await this.tileEntries([...wanted.values()]);
    return plan.map((p) => perfectRoot(tiles.get(p.key)!, p.width, p.offset * HASH_SIZE));
  }

  /** A {@link NodeHashSource} over the tiles, for merkle-proof.ts. */
  source(): NodeHashSource {
    return { size: () => this.leaves.size(), nodeHashes: (nodes) => this.nodeHashes(nodes) };
  }

  /**
   * The stored tiles of one level in index order (verify compares each with the tree it recomputes):
   * streamed with COPY on a PostgreSQL server, page by page otherwise.
   */
  async *stored(level: number): AsyncGenerator<Tile> {
    if (!(await this.available())) return;
    const level_ = Math.trunc(level);
    if (this.db.copyOut) {
      const sql = `SELECT idx, hashes, root FROM audit_tile WHERE level = ${level_} ORDER BY idx`;
      for await (const [idx, hashes, root] of copyTuples(this.db.copyOut(sql))) {
        yield { level, index: Number(idx!.readBigInt64BE(0)), hashes: hashes!, root: root! };
      }
      return;
    }
    const PAGE = 256;
    for (let from = 0; ;) {
      const r = await this.db.query<{ idx: number; hashes: Uint8Array; root: Uint8Array }>(
        'SELECT idx, hashes, root FROM audit_tile WHERE level = $1 AND idx >= $2 ORDER BY idx LIMIT $3',
        [level, from, PAGE],
      );
      for (const row of r.rows) {
        yield { level, index: Number(row.idx), hashes: Buffer.from(row.hashes), root: Buffer.from(row.root) };
      }
      if (r.rows.length < PAGE) return;
      from = Number(r.rows[r.rows.length - 1]!.idx) + 1;
    }
  }
}

/**
 * The tuples of a COPY BINARY stream, each as its fields' bytes (NULL as an empty buffer): for rows of a
 * few kilobytes, such as tiles.
 */
export async function* copyTuples(chunks: AsyncIterable<Buffer>): AsyncGenerator<Buffer[]> {
  let buf: Buffer = Buffer.alloc(0);
  let p = 0;
  let header = false;
  let ended = false;
  for await (const chunk of chunks) {
    if (ended) continue; // drain: the stream ends by itself after the trailer
    buf = p < buf.length ? Buffer.concat([buf.subarray(p), chunk]) : chunk;
    p = 0;
    if (!header) {
      if (buf.length < 19 || buf.length < 19 + buf.readUInt32BE(15)) continue;
      p = 19 + buf.readUInt32BE(15);
      header = true;
    }
    for (;;) {
      if (p + 2 > buf.length) break;
      const n = buf.readInt16BE(p);
      if (n === -1) {
        ended = true;
        break;
      }
      let q = p + 2;
      const fields: Buffer[] = [];
      for (let f = 0; f < n; f++) {
        if (q + 4 > buf.length) break;
        const len = buf.readInt32BE(q);
        q += 4;
        if (q + Math.max(len, 0) > buf.length) break;
        fields.push(buf.subarray(q, q + Math.max(len, 0)));
        q += Math.max(len, 0);
      }
      if (fields.length < n) break;
      yield fields;
      p = q;
    }
  }
  if (header && !ended) throw new Error('COPY stream cut short');
}
