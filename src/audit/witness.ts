/**
 * Checkpoint witnesses: the audit log's signed checkpoints sent to independent witnesses that cosign
 * them (C2SP tlog-witness), their cosignatures checked and kept (C2SP tlog-cosignature, Ed25519
 * `cosignature/v1`), and checked again by `custos audit verify`.
 *
 * A witness keeps, per log, the last tree it cosigned and cosigns a newer one only with a valid
 * consistency proof from it. A log that was truncated or rewritten after a witness cosigned it can
 * then no longer obtain that witness's cosignature: the rewrite is visible outside both databases,
 * to anyone holding the witness's cosigned checkpoints. Checkpoints carry no PHI (an origin line, a
 * tree size and a root hash), so witnesses receive none.
 *
 * All signing and verification is node:crypto Ed25519; this module only implements the encodings.
 *
 * @see https://c2sp.org/tlog-witness
 * @see https://c2sp.org/tlog-cosignature
 * @module
 */
import { createHash, createPublicKey, verify, type KeyObject } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { ConfigError } from '../config/config.ts';
import { EgressGateway, egressFetch } from '../egress/egress.ts';
import { witnessVendor } from '../egress/infrastructure.ts';
import { CustosError } from '../kernel/errors.ts';
import { newId } from '../kernel/ids.ts';
import { errorFields, type Logger } from '../log/logger.ts';
import type { SqlDriver } from '../store/sql-driver.ts';
import type { AuditLog } from './audit-log.ts';
import type { Checkpoints, SignedCheckpoint, StoredCheckpoint } from './checkpoints.ts';
import { parseVerifierKey, SignedNoteError, verifyNote } from './signed-note.ts';

/**
 * The signature type byte of Ed25519 cosignature/v1 keys: "The key ID for Ed25519 cosignatures MUST
 * be computed as SHA-256(<name> || "\n" || 0x04 || 32-byte Ed25519 cosigner public key)[:4]", and
 * "Ed25519 public keys MAY be encoded as vkeys with signature type 0x04" (tlog-cosignature §Format).
 */
export const COSIGNATURE_V1_ALG = 0x04;
/** "The response MUST have a Content-Type of text/x.tlog.size" (tlog-witness §add-checkpoint, 409). */
export const TLOG_SIZE_CONTENT_TYPE = 'text/x.tlog.size';
/** "The client MUST NOT send more than 63 consistency proof lines" (tlog-witness §add-checkpoint). */
export const MAX_PROOF_LINES = 63;
/** Requests per witness and checkpoint: the first, then at most two resends after a 409. */
export const MAX_ATTEMPTS = 3;
/** DER prefix wrapping a raw 32-byte Ed25519 public key (SPKI, RFC 8410). */
const SPKI_ED25519_PREFIX = Buffer.from('302a300506032b6570032100', 'hex');
/** A witness answer larger than this is not read (a few signature lines are expected). */
const MAX_RESPONSE_BYTES = 64 * 1024;
const DEFAULT_TIMEOUT_MS = 10_000;

// ---------------------------------------------------------------------------------------------
// Keys and cosignatures (tlog-cosignature)
// ---------------------------------------------------------------------------------------------

/** A witness's verifier key: an Ed25519 cosignature/v1 vkey (`name+hexKeyId+base64(0x04 || key)`). */
export interface WitnessKey {
  /** The vkey as configured. */
  vkey: string;
  name: string;
  /** 4-byte key ID. */
  keyId: Buffer;
  publicKeyRaw: Buffer;
  publicKey: KeyObject;
}

/** `SHA-256(name || 0x0A || 0x04 || publicKey)[:4]` (tlog-cosignature §Format). */
export function cosignatureKeyId(name: string, publicKeyRaw: Buffer): Buffer {
  return createHash('sha256')
    .update(name, 'utf8')
    .update(Buffer.from([0x0a, COSIGNATURE_V1_ALG]))
    .update(publicKeyRaw)
    .digest()
    .subarray(0, 4);
}

/** Strict base64: anything that does not re-encode to the same text is refused. */
function decodeBase64(s: string): Buffer | undefined {
  const b = Buffer.from(s, 'base64');
  return b.toString('base64') === s ? b : undefined;
}

/** Formats a witness vkey with signature type 0x04. */
export function formatWitnessKey(name: string, publicKeyRaw: Buffer): string {
  if (name.length === 0 || name.includes('+') || /\s/u.test(name) || publicKeyRaw.length !== 32)
    throw new SignedNoteError('malformed_key', 'invalid witness key name or public key');
  const enc = Buffer.concat([Buffer.from([COSIGNATURE_V1_ALG]), publicKeyRaw]).toString('base64');
  return `${name}+${cosignatureKeyId(name, publicKeyRaw).toString('hex')}+${enc}`;
}

/**
 * Parses a witness vkey: signature type 0x04 (Ed25519 cosignature/v1) and a key ID that matches the
 * name and key. A type-0x01 key (a log's note-signing key) is refused: cosignatures are made and
 * identified with the 0x04 key ID, so such a key would never match a cosignature.
 *
 * @throws SignedNoteError `malformed_key`, with the reason.
 * @see https://c2sp.org/signed-note#verifier-keys
 */
export function parseWitnessKey(vkey: string): WitnessKey {
  const m = /^([^+\s]+)\+([0-9a-f]{8})\+(\S+)$/u.exec(vkey);
  if (!m) throw new SignedNoteError('malformed_key', 'a witness key is name+keyid+base64 (a vkey)');
  const [, name, hex, b64] = m as unknown as [string, string, string, string];
  const key = decodeBase64(b64);
  if (!key || key.length !== 33)
    throw new SignedNoteError('malformed_key', 'the witness key is not 33 bytes of base64');
  if (key[0] !== COSIGNATURE_V1_ALG)
    throw new SignedNoteError(
      'malformed_key',
      `the witness key has signature type 0x${key[0]!.toString(16).padStart(2, '0')}, not 0x04 (Ed25519 cosignature/v1)`,
    );
  const publicKeyRaw = key.subarray(1);
  const keyId = cosignatureKeyId(name, publicKeyRaw);
  if (keyId.toString('hex') !== hex)
    throw new SignedNoteError('malformed_key', 'the witness key ID does not match its name and key');
  const publicKey = createPublicKey({
    key: Buffer.concat([SPKI_ED25519_PREFIX, publicKeyRaw]),
    format: 'der',
    type: 'spki',
  });
  return { vkey, name, keyId, publicKeyRaw, publicKey };
}

/**
 * The message an Ed25519 cosignature signs: "two newline (U+000A) terminated lines (one header line
 * and one timestamp line) followed by the whole note body of the cosigned checkpoint (including the
 * final newline, but not including any signature lines)" — `cosignature/v1\ntime <seconds>\n<body>`
 * (tlog-cosignature §Ed25519 signed message).
 */
export function cosignedMessage(checkpointText: string, timestamp: number): Buffer {
  return Buffer.from(`cosignature/v1\ntime ${timestamp}\n${checkpointText}`, 'utf8');
}

/** A note signature line split into its parts (not verified). */
export interface SignatureLine {
  name: string;
  /** The decoded signature: 4-byte key ID, then the signature proper. */
  raw: Buffer;
}

/** Parses `— <name> <base64>` (without the newline); undefined when it is not one. */
export function parseSignatureLine(line: string): SignatureLine | undefined {
  const m = /^\u2014 ([^ ]+) ([A-Za-z0-9+/=]+)$/u.exec(line);
  if (!m) return undefined;
  const raw = decodeBase64(m[2]!);
  if (!raw || raw.length < 5) return undefined;
  return { name: m[1]!, raw };
}

/**
 * The parts of an Ed25519 cosignature: `base64(keyID || timestamp || signature)` with a 4-byte key
 * ID, an 8-byte big-endian POSIX timestamp ("It MUST NOT exceed 2^63 - 1") and a 64-byte Ed25519
 * signature: 76 bytes (tlog-cosignature §Format, `timestamped_signature`). Undefined when the length
 * or timestamp is wrong (a timestamp beyond JavaScript's safe integers is refused too).
 */
export function parseCosignature(
  raw: Buffer,
): { keyId: Buffer; timestamp: number; signature: Buffer } | undefined {
  if (raw.length !== 4 + 8 + 64) return undefined;
  const ts = raw.readBigUInt64BE(4);
  if (ts > BigInt(Number.MAX_SAFE_INTEGER)) return undefined;
  return { keyId: raw.subarray(0, 4), timestamp: Number(ts), signature: raw.subarray(12) };
}

/** Why a cosignature was refused. */
export class CosignatureError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'CosignatureError';
  }
}

/**
 * Verifies one cosignature line of `key` over a checkpoint body. Returns the cosignature's time
 * (POSIX seconds).
 *
 * @throws CosignatureError when the line is not this witness's (name, key ID), is malformed, or its
 *   signature does not verify over `cosignature/v1\ntime <t>\n` + the checkpoint body.
 */
export function verifyCosignature(checkpointText: string, line: string, key: WitnessKey): number {
  const sig = parseSignatureLine(line);
  if (!sig) throw new CosignatureError('not a note signature line');
  if (sig.name !== key.name || !sig.raw.subarray(0, 4).equals(key.keyId))
    throw new CosignatureError('the line is not signed by this witness key');
  const c = parseCosignature(sig.raw);
  if (!c)
    throw new CosignatureError(
      'a cosignature/v1 signature is 76 bytes: key ID, timestamp, Ed25519 signature',
    );
  if (!verify(null, cosignedMessage(checkpointText, c.timestamp), key.publicKey, c.signature))
    throw new CosignatureError('the cosignature does not verify over the checkpoint');
  return c.timestamp;
}

/** Whether a signature line names this witness key (name and key ID): the lines a client checks. */
function isLineOf(sig: SignatureLine, key: WitnessKey): boolean {
  return sig.name === key.name && sig.raw.subarray(0, 4).equals(key.keyId);
}

/** Splits a signed note into its text (with the final newline) and its signature lines. */
function splitNote(note: string): { text: string; lines: string[] } | undefined {
  if (!note.endsWith('\n')) return undefined;
  const split = note.lastIndexOf('\n\n');
  if (split < 0) return undefined;
  return { text: note.slice(0, split + 1), lines: note.slice(split + 2, -1).split('\n') };
}

// ---------------------------------------------------------------------------------------------
// The add-checkpoint request (tlog-witness)
// ---------------------------------------------------------------------------------------------

/** An add-checkpoint request body and what it is made of. */
export interface WitnessRequest {
  /** The old size: the tree size the witness last cosigned (0: never, or unknown). */
  old: number;
  treeSize: number;
  /** Consistency proof from `old` to `treeSize`, base64 (empty for an old size of 0 or equal sizes). */
  proof: string[];
  /** The signed checkpoint note. */
  checkpoint: string;
  /** The exact request body: `POST <submission prefix>/add-checkpoint`. */
  body: string;
}

/**
 * The add-checkpoint body: "an old size line, zero or more consistency proof lines, and an empty
 * line, followed by a checkpoint. Each line MUST terminate in a newline character (U+000A)"; the old
 * size line is `old <decimal, no leading zeroes>` and "each consistency proof line MUST encode a
 * single hash in base64" (tlog-witness §add-checkpoint).
 */
export function formatAddCheckpoint(old: number, proof: readonly Buffer[], note: string): string {
  if (!Number.isSafeInteger(old) || old < 0) throw new RangeError('old must be a whole number');
  if (proof.length > MAX_PROOF_LINES) throw new RangeError('more than 63 consistency proof lines');
  return `old ${old}\n${proof.map((h) => `${h.toString('base64')}\n`).join('')}\n${note}`;
}

function badRequest(diagnostics: string): CustosError {
  return new CustosError('BAD_REQUEST', [
    { severity: 'error', code: 'value', expression: 'old', diagnostics },
  ]);
}

/**
 * Builds the add-checkpoint request for the newest signed checkpoint (signing one if none exists,
 * or `cp` when given) with a consistency proof from tree size `old`. An old size of 0 has no proof
 * lines: "The proof MUST be empty if the old size is zero" (tlog-witness §add-checkpoint).
 *
 * @throws CustosError BAD_REQUEST when `old` is not a whole number or is larger than the checkpoint.
 * @example
 * const r = await witnessRequest(core.checkpoints, 0);
 * // r.body === 'old 0\n\nexample.org/custos/audit\n42\n…=\n\n— example.org/custos/audit …\n'
 */
export async function witnessRequest(
  checkpoints: Checkpoints,
  old: unknown,
  cp?: SignedCheckpoint,
): Promise<WitnessRequest> {
  if (typeof old !== 'number' || !Number.isSafeInteger(old) || old < 0)
    throw badRequest('old must be a tree size: a whole number, 0 when the witness has cosigned nothing');
  const head = cp ?? (await checkpoints.latest()) ?? (await checkpoints.checkpoint());
  if (old > head.treeSize)
    throw badRequest(`old (${old}) is larger than the newest signed checkpoint (${head.treeSize})`);
  // consistency() checks the proof against both tree heads, and each head against its stored
  // checkpoint when there is one: a rewritten log throws here before anything is sent.
  const proof = old === 0 ? [] : (await checkpoints.consistency(old, head.treeSize)).proof;
  const hashes = proof.map((h) => Buffer.from(h, 'hex'));
  return {
    old,
    treeSize: head.treeSize,
    proof: hashes.map((h) => h.toString('base64')),
    checkpoint: head.note,
    body: formatAddCheckpoint(old, hashes, head.note),
  };
}

// ---------------------------------------------------------------------------------------------
// The witness client
// ---------------------------------------------------------------------------------------------

/** A configured witness: its vkey and its submission prefix (CUSTOS_AUDIT_WITNESSES). */
export interface WitnessEndpoint {
  vkey: string;
  url: string;
}

/**
 * Why a witness did not cosign. Evidence of a log that changed (`inconsistent`, `conflict`,
 * `witness_ahead`, `local_inconsistent`) and of a misbehaving or misconfigured witness
 * (`bad_cosignature`, `no_cosignature`, `untrusted_key`, `unknown_log`, `bad_request`) is appended to
 * the audit log when it first occurs; `unreachable` and `http_error` are only logged.
 */
export type WitnessProblem =
  /** Network error or no answer within the timeout. */
  | 'unreachable'
  /** A 5xx or another status the protocol does not define, or a malformed 409. */
  | 'http_error'
  /** 400: the witness found the request malformed. */
  | 'bad_request'
  /** 403: none of the checkpoint's signatures verify against a key the witness trusts for our origin. */
  | 'untrusted_key'
  /** 404: the witness does not know our origin. */
  | 'unknown_log'
  /** 422: the consistency proof from the tree the witness cosigned does not verify: a fork or rewrite. */
  | 'inconsistent'
  /** 409 at the checkpoint's own size (same size, another root), or still 409 after every resend. */
  | 'conflict'
  /** The witness cosigned a larger tree than the log now has: the log was truncated. */
  | 'witness_ahead'
  /** A returned cosignature from the witness's key does not verify. */
  | 'bad_cosignature'
  /** A 200 without a cosignature from the configured key. */
  | 'no_cosignature'
  /** No consistency proof could be made here: a stored checkpoint no longer matches the log. */
  | 'local_inconsistent';

const LOGGED_ONLY: ReadonlySet<WitnessProblem> = new Set(['unreachable', 'http_error']);

/** The outcome of one checkpoint's submission to one witness. */
export interface WitnessResult {
  witness: string;
  keyId: string;
  treeSize: number;
  ok: boolean;
  problem?: WitnessProblem;
  /** HTTP status of the last answer, if any. */
  status?: number;
  /** The cosignature lines received and verified (ok only). */
  cosignatures?: string[];
  /** Requests sent for this checkpoint (one, plus one per 409 followed). */
  attempts: number;
}

/** Where a witness stands: `custos audit witnesses`, POST /admin/audit/witnesses. */
export interface WitnessStatus {
  name: string;
  keyId: string;
  vkey: string;
  url: string;
  /** The largest tree size it has cosigned (stored cosignatures; 0 = none). */
  cosignedSize: number;
  /** When it made that cosignature (its timestamp), ISO 8601. */
  cosignedAt?: string;
  /** The newest signed checkpoint's size. */
  latestCheckpointSize: number;
  /** Entries of the newest checkpoint that this witness has not cosigned (0 = up to date). */
  lag: number;
  /** Of this process: the last submission and its problem (none after a success). */
  lastAttemptAt?: string;
  problem?: WitnessProblem;
}

/** Cosignatures checked by `custos audit verify` (verifyAuditLog's `witnesses` option). */
export interface WitnessVerifyReport {
  /** Distinct signed checkpoints (stored and exported). */
  checkpoints: number;
  /** Of those, how many carry at least one valid cosignature of a configured witness. */
  witnessed: number;
  /** Valid cosignatures checked (database rows and exported cosigned notes). */
  cosignatures: number;
  /** Cosignatures by keys no longer configured: not checked. */
  unchecked: number;
  /** Per configured witness: how many checkpoints it cosigned, and the largest. */
  byWitness: { name: string; keyId: string; checkpoints: number; latestTreeSize: number | undefined }[];
  /** The first (smallest tree size) cosignature that does not verify. */
  firstBad:
    | {
        treeSize: number;
        witness: string;
        /** Signature invalid; no signed checkpoint of that size with that text; unreadable. */
        problem: 'invalid_cosignature' | 'no_checkpoint' | 'malformed';
        external: boolean;
      }
    | undefined;
}

/** What verifyAuditLog needs to check cosignatures. */
export interface CosignatureVerifier {
  verify(checkpoints: readonly StoredCheckpoint[]): Promise<WitnessVerifyReport>;
}

interface WitnessState {
  key: WitnessKey;
  /** The submission prefix, without a trailing slash. */
  url: string;
  host: string;
  lastAttemptAt?: Date;
  problem?: WitnessProblem;
}

/** A stored cosignature row (table audit_cosignature). */
interface CosignatureRow {
  tree_size: number | string;
  witness: string;
  signature: string;
  note: string;
}

const COSIGNED_FILE = /^checkpoint-(\d{12})\.cosigned\.note$/;

/** The export-directory name of a checkpoint's cosigned note. */
export function cosignedFileName(treeSize: number): string {
  return `checkpoint-${String(treeSize).padStart(12, '0')}.cosigned.note`;
}

/**
 * The witness client of the audit log. After each scheduled checkpoint, {@link tick} sends the newest
 * signed checkpoint to every configured witness that has not cosigned it (through the egress port,
 * purpose `audit-witness`), follows a 409 to the witness's size (at most {@link MAX_ATTEMPTS}
 * requests), verifies every cosignature against the witness's key, and keeps the cosigned note in
 * the INSERT-only table `audit_cosignature` and, when configured, the checkpoint export directory.
 * A failure is logged (and, when it is evidence, audited) and retried at the next interval; nothing
 * here is on the path of a PHI request.
 */
export class Witnesses implements CosignatureVerifier {
  private readonly witnesses: WitnessState[];
  private round: Promise<WitnessResult[]> | undefined;
  private readonly abort = new AbortController();
  private readonly egress: EgressGateway;

  constructor(
    private readonly opts: {
      audit: AuditLog;
      checkpoints: Checkpoints;
      witnesses: readonly WitnessEndpoint[];
      exportDir?: string;
      log: Logger;
      /** Per request (default 10 s). */
      timeoutMs?: number;
      /** The egress gateway (default: one that knows only these witnesses, as infrastructure). */
      egress?: EgressGateway;
    },
  ) {
    this.egress =
      opts.egress ??
      EgressGateway.of(
        opts.witnesses.map((w, i) => witnessVendor(w.url, i)),
        { audit: opts.audit, log: opts.log },
      );
    this.witnesses = opts.witnesses.map((w) => {
      let key: WitnessKey;
      try {
        key = parseWitnessKey(w.vkey);
      } catch (e) {
        throw new ConfigError(
          'CUSTOS_AUDIT_WITNESSES',
          e instanceof Error ? e.message : 'invalid witness key',
        );
      }
      const url = w.url.replace(/\/+$/, '');
      return { key, url, host: new URL(url).hostname };
    });
  }

  private get db(): SqlDriver {
    return this.opts.audit.database;
  }

  /** Configured witnesses' keys. */
  get keys(): readonly WitnessKey[] {
    return this.witnesses.map((w) => w.key);
  }

  /**
   * Scheduled: submits the newest signed checkpoint to each witness that has not cosigned it (or
   * failed last time). Never throws; a round still running is not started again.
   */
  async tick(): Promise<void> {
    if (this.witnesses.length === 0 || this.round || this.abort.signal.aborted) return;
    try {
      const cp = await this.opts.checkpoints.latest();
      if (!cp) return;
      const sizes = await this.cosignedSizes();
      const behind = this.witnesses.filter(
        (w) => w.problem !== undefined || (sizes.get(w.key.vkey)?.size ?? 0) !== cp.treeSize,
      );
      if (behind.length > 0) await this.runRound(cp, behind);
    } catch (e) {
      this.opts.log.error('audit.witness_round_failed', errorFields(e));
    }
  }

  /**
   * Submits the newest signed checkpoint (signing one if there is none) to every configured witness.
   * Resolves with one result per witness; witness failures are results, not exceptions. While a
   * round runs, its results are what a second call gets.
   */
  submit(): Promise<WitnessResult[]> {
    return this.runRound(undefined, this.witnesses);
  }

  private runRound(
    cp: SignedCheckpoint | undefined,
    only: readonly WitnessState[],
  ): Promise<WitnessResult[]> {
    if (this.round) return this.round;
    const run = (async () => {
      const head = cp ?? (await this.opts.checkpoints.latest()) ?? (await this.opts.checkpoints.checkpoint());
      const results = await Promise.all(only.map((w) => this.submitTo(w, head)));
      const lines = results.flatMap((r) => r.cosignatures ?? []);
      if (lines.length > 0) this.exportCosigned(head, lines);
      return results;
    })();
    this.round = run;
    return run.finally(() => {
      this.round = undefined;
    });
  }

  private async submitTo(w: WitnessState, cp: SignedCheckpoint): Promise<WitnessResult> {
    const base = { witness: w.key.name, keyId: w.key.keyId.toString('hex'), treeSize: cp.treeSize };
    w.lastAttemptAt = new Date();
    // What the witness last cosigned as far as the stored cosignatures say: shared by every process
    // on this audit database. A witness that knows better answers 409 with its size.
    let old = (await this.cosignedSizes()).get(w.key.vkey)?.size ?? 0;
    let attempts = 0;
    let status: number | undefined;
    const fail = async (problem: WitnessProblem): Promise<WitnessResult> => {
      await this.problem(w, problem, cp.treeSize, old, status);
      return { ...base, ok: false, problem, status, attempts };
    };
    while (attempts < MAX_ATTEMPTS) {
      if (old > cp.treeSize) return fail('witness_ahead');
      let req: WitnessRequest;
      try {
        req = await witnessRequest(this.opts.checkpoints, old, cp);
      } catch (e) {
        this.opts.log.error('audit.witness_proof_failed', { host: w.host, seq: old, ...errorFields(e) });
        return fail('local_inconsistent');
      }
      attempts++;
      let res: Response;
      let text: string;
      try {
        res = await egressFetch(this.egress, {
          purpose: 'audit-witness',
          // Signed tree heads and hashes: no PHI (ADR 0009).
          dataClass: 'none',
          url: `${w.url}/add-checkpoint`,
          init: {
            method: 'POST',
            headers: { 'content-type': 'text/plain; charset=utf-8' },
            body: req.body,
            signal: AbortSignal.any([
              this.abort.signal,
              AbortSignal.timeout(this.opts.timeoutMs ?? DEFAULT_TIMEOUT_MS),
            ]),
          },
        });
        text = await readLimited(res);
      } catch {
        status = undefined;
        return fail('unreachable');
      }
      status = res.status;
      if (res.status === 200) {
        let cosignatures: string[];
        try {
          cosignatures = this.checkResponse(w.key, cp, text);
        } catch (e) {
          return fail(e instanceof CosignatureError ? 'bad_cosignature' : 'no_cosignature');
        }
        if (cosignatures.length === 0) return fail('no_cosignature');
        await this.store(w.key, cp, cosignatures);
        if (w.problem) this.opts.log.info('audit.witness_recovered', { host: w.host, seq: cp.treeSize });
        w.problem = undefined;
        this.opts.log.info('audit.witness_cosigned', { host: w.host, seq: cp.treeSize, count: attempts });
        return { ...base, ok: true, status, cosignatures, attempts };
      }
      if (res.status === 409) {
        // "The response body MUST consist of the tree size of the latest cosigned checkpoint in
        // decimal, followed by a newline" with Content-Type text/x.tlog.size.
        const type = (res.headers.get('content-type') ?? '').split(';')[0]!.trim().toLowerCase();
        const m = /^(0|[1-9][0-9]{0,15})\n$/.exec(text);
        if (type !== TLOG_SIZE_CONTENT_TYPE || !m || !Number.isSafeInteger(Number(m[1])))
          return fail('http_error');
        const size = Number(m[1]);
        // The witness is at the size we sent, yet refuses: only a different root at the same size
        // (tlog-witness: "If the old size matches the checkpoint size, the witness MUST check that
        // the root hashes are also identical. If they don't match, … 409 Conflict").
        if (size === old) return fail('conflict');
        this.opts.log.info('audit.witness_size', { host: w.host, seq: size });
        old = size;
        continue;
      }
      if (res.status === 422) return fail('inconsistent');
      if (res.status === 400) return fail('bad_request');
      if (res.status === 403) return fail('untrusted_key');
      if (res.status === 404) return fail('unknown_log');
      return fail('http_error');
    }
    return fail('conflict');
  }

  /**
   * The cosignature lines of a 200 answer: "a sequence of one or more note signature lines, each
   * starting with the — character (U+2014) and ending with a newline". "The client MUST ignore any
   * cosignatures from unknown keys"; one from the witness's key that does not verify refuses the
   * whole answer (CosignatureError).
   */
  private checkResponse(key: WitnessKey, cp: SignedCheckpoint, text: string): string[] {
    const note = splitNote(cp.note);
    if (!note) throw new Error('our checkpoint note is malformed');
    if (!text.endsWith('\n')) throw new Error('the answer does not end with a newline');
    const valid: string[] = [];
    for (const line of text.slice(0, -1).split('\n')) {
      const sig = parseSignatureLine(line);
      if (!sig) throw new Error('the answer holds something other than signature lines');
      if (!isLineOf(sig, key)) continue;
      verifyCosignature(note.text, line, key);
      valid.push(line);
    }
    return valid;
  }

  private async store(key: WitnessKey, cp: SignedCheckpoint, lines: readonly string[]): Promise<void> {
    for (const line of lines) {
      const sig = parseSignatureLine(line)!;
      const c = parseCosignature(sig.raw)!;
      await this.db.query(
        `INSERT INTO audit_cosignature (tree_size, witness, signature, cosigned_at, note)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tree_size, signature) DO NOTHING`,
        [cp.treeSize, key.vkey, line, c.timestamp, `${cp.note}${line}\n`],
      );
    }
  }

  /**
   * Writes `checkpoint-<size>.cosigned.note` in the export directory: the checkpoint, our signature
   * and every cosignature of it known so far (those already in the file are kept). Replaced
   * atomically (rename), unlike the checkpoint files: it grows as witnesses cosign.
   */
  private exportCosigned(cp: SignedCheckpoint, lines: readonly string[]): void {
    const dir = this.opts.exportDir;
    if (!dir) return;
    try {
      fs.mkdirSync(dir, { recursive: true });
      const file = path.join(dir, cosignedFileName(cp.treeSize));
      const known = new Set(splitNote(cp.note)!.lines);
      const extra: string[] = [];
      const add = (l: string) => {
        if (!known.has(l)) {
          known.add(l);
          extra.push(l);
        }
      };
      if (fs.existsSync(file)) {
        const prior = splitNote(fs.readFileSync(file, 'utf8'));
        if (prior && prior.text === splitNote(cp.note)!.text) prior.lines.forEach(add);
      }
      lines.forEach(add);
      const tmp = `${file}.${process.pid}.tmp`;
      fs.writeFileSync(tmp, `${cp.note}${extra.map((l) => `${l}\n`).join('')}`);
      fs.renameSync(tmp, file);
    } catch (e) {
      this.opts.log.error('audit.witness_export_failed', errorFields(e));
    }
  }

  /** Logs a failure; audits it the first time it occurs for this witness (unless operational only). */
  private async problem(
    w: WitnessState,
    problem: WitnessProblem,
    treeSize: number,
    old: number,
    status: number | undefined,
  ): Promise<void> {
    const first = w.problem !== problem;
    w.problem = problem;
    const evidence = !LOGGED_ONLY.has(problem);
    const fields = { host: w.host, code: problem, seq: treeSize, count: old, ...(status ? { status } : {}) };
    if (evidence) this.opts.log.error('audit.witness_refused', fields);
    else this.opts.log.warn('audit.witness_failed', fields);
    if (!evidence || !first || this.abort.signal.aborted) return;
    try {
      await this.opts.audit.append({
        v: 1,
        id: newId(),
        time: new Date().toISOString(),
        phase: 'access',
        action: 'admin',
        outcome: 'failed',
        code: `witness.${problem}`,
        requestId: newId(),
        actor: { roles: ['custos'] },
        resource: { type: 'AuditWitness', id: w.key.keyId.toString('hex') },
        count: treeSize,
        source: {},
      });
    } catch (e) {
      this.opts.log.error('audit.witness_audit_failed', errorFields(e));
    }
  }

  /** Per witness vkey: the largest tree size it cosigned and that cosignature's time. */
  private async cosignedSizes(): Promise<Map<string, { size: number; at: number }>> {
    const r = await this.db.query<{ witness: string; size: number | string; at: number | string }>(
      `SELECT witness, max(tree_size) AS size, max(cosigned_at) AS at FROM audit_cosignature GROUP BY witness`,
    );
    return new Map(r.rows.map((row) => [row.witness, { size: Number(row.size), at: Number(row.at) }]));
  }

  /** Where each configured witness stands, with its lag behind the newest signed checkpoint. */
  async status(): Promise<WitnessStatus[]> {
    const latest = await this.db.query<{ size: number | string | null }>(
      'SELECT max(tree_size) AS size FROM audit_checkpoint',
    );
    const latestSize = Number(latest.rows[0]?.size ?? 0);
    const sizes = await this.cosignedSizes();
    return this.witnesses.map((w) => {
      const c = sizes.get(w.key.vkey);
      return {
        name: w.key.name,
        keyId: w.key.keyId.toString('hex'),
        vkey: w.key.vkey,
        url: w.url,
        cosignedSize: c?.size ?? 0,
        ...(c ? { cosignedAt: new Date(c.at * 1000).toISOString() } : {}),
        latestCheckpointSize: latestSize,
        lag: Math.max(0, latestSize - (c?.size ?? 0)),
        ...(w.lastAttemptAt ? { lastAttemptAt: w.lastAttemptAt.toISOString() } : {}),
        ...(w.problem ? { problem: w.problem } : {}),
      };
    });
  }

  /**
   * Checks every stored cosignature (table rows and exported cosigned notes): the note's checkpoint
   * text is that of a signed checkpoint of its size among `checkpoints` (whose roots verify checks
   * against the log), and the cosignature verifies against the configured witness key. Cosignatures
   * of keys not configured are counted, not checked.
   */
  async verify(checkpoints: readonly StoredCheckpoint[]): Promise<WitnessVerifyReport> {
    const texts = new Map<number, Set<string>>();
    for (const c of checkpoints) {
      const n = splitNote(c.note);
      if (!n) continue;
      let s = texts.get(c.treeSize);
      if (!s) texts.set(c.treeSize, (s = new Set()));
      s.add(n.text);
    }
    const ourKey = this.opts.checkpoints.verifierKey();
    const our = parseVerifierKey(ourKey);
    const witnessed = new Map<string, Set<number>>(); // vkey → tree sizes
    let cosignatures = 0;
    let unchecked = 0;
    let firstBad: WitnessVerifyReport['firstBad'];
    const bad = (
      treeSize: number,
      witness: string,
      problem: NonNullable<WitnessVerifyReport['firstBad']>['problem'],
      external: boolean,
    ) => {
      if (!firstBad || treeSize < firstBad.treeSize) firstBad = { treeSize, witness, problem, external };
    };
    // One cosigned note: its text must be our signed checkpoint of that size; each line of a
    // configured witness must verify. A table row gives its line (`only`) and the witness it claims.
    const check = (treeSize: number, note: string, external: boolean, only?: string, claimed?: string) => {
      const n = splitNote(note);
      if (!n) return bad(treeSize, only ?? '', 'malformed', external);
      let ours = false;
      try {
        verifyNote(note, [ourKey]);
        ours = true;
      } catch {
        /* reported below */
      }
      for (const line of only === undefined ? n.lines : [only]) {
        const sig = parseSignatureLine(line);
        if (!sig) return bad(treeSize, '', 'malformed', external);
        const key = this.keys.find((k) => isLineOf(sig, k));
        const claimedKey = this.keys.find((k) => k.vkey === claimed);
        if (claimedKey && key !== claimedKey) return bad(treeSize, claimedKey.name, 'malformed', external);
        if (!key) {
          // Our own signature (checked by verifyNote above), or a witness no longer configured.
          if (!(sig.name === our.name && sig.raw.subarray(0, 4).equals(our.keyId))) unchecked++;
          continue;
        }
        if (!n.lines.includes(line)) return bad(treeSize, key.name, 'malformed', external);
        // The cosigned text must be a checkpoint we signed, of this size, that verify checks against
        // the log: a cosignature of anything else proves nothing about this log.
        if (!ours || !texts.get(treeSize)?.has(n.text))
          return bad(treeSize, key.name, 'no_checkpoint', external);
        try {
          verifyCosignature(n.text, line, key);
        } catch {
          return bad(treeSize, key.name, 'invalid_cosignature', external);
        }
        cosignatures++;
        let s = witnessed.get(key.vkey);
        if (!s) witnessed.set(key.vkey, (s = new Set()));
        s.add(treeSize);
      }
    };
    const rows = await this.db.query<CosignatureRow>(
      'SELECT tree_size, witness, signature, note FROM audit_cosignature ORDER BY tree_size',
    );
    for (const r of rows.rows) check(Number(r.tree_size), r.note, false, r.signature, r.witness);
    const dir = this.opts.exportDir;
    if (dir && fs.existsSync(dir)) {
      for (const f of fs.readdirSync(dir)) {
        const m = COSIGNED_FILE.exec(f);
        if (m) check(Number(m[1]), fs.readFileSync(path.join(dir, f), 'utf8'), true);
      }
    }
    const allWitnessed = new Set([...witnessed.values()].flatMap((s) => [...s]));
    return {
      checkpoints: texts.size,
      witnessed: [...texts.keys()].filter((size) => allWitnessed.has(size)).length,
      cosignatures,
      unchecked,
      byWitness: this.keys.map((k) => {
        const s = witnessed.get(k.vkey);
        return {
          name: k.name,
          keyId: k.keyId.toString('hex'),
          checkpoints: s?.size ?? 0,
          latestTreeSize: s && s.size > 0 ? Math.max(...s) : undefined,
        };
      }),
      firstBad,
    };
  }

  /** Stops scheduled rounds and aborts requests in flight; waits for the round to end. */
  async close(): Promise<void> {
    this.abort.abort();
    await this.round?.catch(() => {});
  }
}

/** The body of a response, refusing more than MAX_RESPONSE_BYTES. */
async function readLimited(res: Response): Promise<string> {
  const declared = Number(res.headers.get('content-length') ?? '0');
  if (declared > MAX_RESPONSE_BYTES) {
    await res.body?.cancel();
    throw new Error('witness answer too large');
  }
  const buf = Buffer.from(await res.arrayBuffer());
  if (buf.length > MAX_RESPONSE_BYTES) throw new Error('witness answer too large');
  return buf.toString('utf8');
}
