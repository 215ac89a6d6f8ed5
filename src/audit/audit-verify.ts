import type { AuditLog } from './audit-log.ts';
import { leafHash } from './audit-event.ts';
import { MerkleAccumulator } from './merkle-proof.ts';
import type { CheckpointReport, Checkpoints } from './checkpoints.ts';

export interface AuditVerifyReport {
  ok: boolean;
  size: number;
  /** RFC 9162 Merkle tree head over all leaves, hex (SHA-256("") for an empty log). */
  rootHash: string;
  /** First sequence number that does not verify (hash mismatch, gap, undecodable entry). */
  firstBadSeq: number | undefined;
  problem: 'leaf_hash_mismatch' | 'sequence_gap' | 'undecodable_entry' | undefined;
  /** Write attempts (request ids) with no recorded outcome: a crash or an audit failure after commit. */
  attemptsWithoutOutcome: string[];
  /** Signed checkpoints checked (signature, and root = tree head of the log at that size). */
  checkpoints?: CheckpointReport;
}

/** Recomputes every leaf hash from the stored bytes and the tree head; finds dangling write attempts. */
export async function verifyAuditLog(log: AuditLog, checkpoints?: Checkpoints): Promise<AuditVerifyReport> {
  const size = await log.size();
  const acc = new MerkleAccumulator();
  const pendingAttempts = new Set<string>();
  let expected = 0;
  let firstBadSeq: number | undefined;
  let problem: AuditVerifyReport['problem'];
  const PAGE = 2000;
  for (;;) {
    const rows = await log.read(expected, PAGE);
    for (const row of rows) {
      if (firstBadSeq === undefined) {
        if (row.seq !== expected) {
          firstBadSeq = expected;
          problem = 'sequence_gap';
        } else if (!leafHash(row.entry).equals(row.leafHash)) {
          firstBadSeq = row.seq;
          problem = 'leaf_hash_mismatch';
        }
      }
      acc.add(leafHash(row.entry));
      try {
        const e = JSON.parse(row.entry.toString('utf8')) as { phase?: string; requestId?: string };
        if (e.phase === 'attempt' && e.requestId) pendingAttempts.add(e.requestId);
        if (e.phase === 'outcome' && e.requestId) pendingAttempts.delete(e.requestId);
      } catch {
        if (firstBadSeq === undefined) {
          firstBadSeq = row.seq;
          problem = 'undecodable_entry';
        }
      }
      expected = row.seq + 1;
    }
    if (rows.length < PAGE) break;
  }
  if (firstBadSeq === undefined && expected !== size) {
    firstBadSeq = expected;
    problem = 'sequence_gap';
  }
  const cps = checkpoints ? await checkpoints.verifyAll() : undefined;
  return {
    ok: firstBadSeq === undefined && cps?.firstBadTreeSize === undefined,
    checkpoints: cps,
    size,
    rootHash: acc.root().toString('hex'),
    firstBadSeq,
    problem,
    attemptsWithoutOutcome: [...pendingAttempts],
  };
}
