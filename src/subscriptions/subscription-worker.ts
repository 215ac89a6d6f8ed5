import { CustosError, ERROR_CATALOG, isCustosError, type ErrorCode } from '../kernel/errors.ts';
import { newId } from '../kernel/ids.ts';
import { errorFields, type Logger } from '../log/logger.ts';
import type { SqlDriver } from '../store/sql-driver.ts';
import type { PhiGateway, Principal } from '../phi/gateway.ts';
import { egressFetch, type EgressGateway } from '../egress/egress.ts';
import { normalizeHost } from '../egress/address-policy.ts';
import type { DestinationSource } from '../egress/vendor-registry.ts';
import { CHANNEL_SERVICE, type SubscriptionFlow } from '../egress/flow-map.ts';
import { projectCoverage } from '../admin/project-baa.ts';
import { TtlCache } from '../kernel/ttl-cache.ts';
import { recipientDomain, SmtpError, type MailMessage, type SmtpMailer } from '../egress/smtp-mailer.ts';
import { patientCompartment } from '../fhir/patient-compartment.ts';
import { parseSubscription, SubscriptionRefusal, type SubscriptionSpec } from './subscription-channel.ts';
import { SubscriptionQueue, type Change, type Delivery } from './subscription-queue.ts';

/**
 * FHIR R4 rest-hook subscriptions (docs/phi-boundary.md, "Subscriptions"): the worker that finds
 * the resource versions matching each active Subscription and delivers their notifications, at
 * least once, through the egress gateway.
 *
 * The PHI path, end to end:
 *   resource_version (metadata only: project, type, id, version) ──► change feed (cursor, migration 10)
 *   ──► PHI gateway: search `<criteria>&_id=<ids>` as the subscription's project's system principal
 *       (purpose of use, policy, decryption, an audit event naming the patients)
 *   ──► delivery queue (which version to notify, never its content)
 *   ──► PHI gateway: vread of that version for a full-resource payload (audited, minimum necessary)
 *   ──► egress gateway: registered vendor endpoint, the payload's data class, BAA, SSRF, audited
 *   ──► the subscriber's endpoint.
 *
 * The worker does not change the gateway: it reads it like any client, under the principal
 * below, and writes `Subscription.status` (requested → active or error) through it.
 */

/** The client id of the worker's principal, as the audit log shows it. */
export const SUBSCRIPTION_CLIENT_ID = 'custos-subscriptions';
/** The egress purpose code of notifications (flow map, audit). */
export const SUBSCRIPTION_EGRESS_PURPOSE = 'subscription';
/** The header carrying the notification id, stable across retries and replays: receivers dedupe on it. */
export const NOTIFICATION_ID_HEADER = 'x-custos-notification-id';
export const SUBSCRIPTION_ID_HEADER = 'x-custos-subscription-id';

export interface SubscriptionWorkerOptions {
  /** How often the change feed and the queue are read when idle (ms). */
  pollMs: number;
  /** Versions read from the change feed per round. */
  batchSize: number;
  /** Attempts before a notification becomes a dead letter. */
  maxAttempts: number;
  /** Backoff: base · 2^(attempt−1), at most retryMaxMs, with ±20% jitter. */
  retryBaseMs: number;
  retryMaxMs: number;
  /** One attempt (connect, send, answer) gives up after this long. */
  requestTimeoutMs: number;
  /** Notifications in flight at once. */
  concurrency: number;
  /** Consecutive refusals by the egress gateway after which a subscription goes to `error`. */
  refusalsBeforeError: number;
  /** The purpose of use of the worker's reads (matching and full-resource payloads). */
  purpose: string;
  /** Delivered notifications are kept this long (a second worker dedupes on them), then forgotten. */
  deliveredRetentionMs: number;
}

export const DEFAULT_SUBSCRIPTION_OPTIONS: Readonly<SubscriptionWorkerOptions> = Object.freeze({
  pollMs: 250,
  batchSize: 500,
  maxAttempts: 8,
  retryBaseMs: 2_000,
  retryMaxMs: 10 * 60_000,
  requestTimeoutMs: 10_000,
  concurrency: 8,
  refusalsBeforeError: 3,
  purpose: 'HOPERAT',
  deliveredRetentionMs: 86_400_000,
});

export interface SubscriptionWorkerDeps {
  db: SqlDriver;
  /** A PHI gateway over the resource database (the server's own configuration). */
  gateway: PhiGateway;
  egress: EgressGateway;
  /** Where the activation check looks the endpoint up (the vendor registry). */
  vendors: DestinationSource;
  isResourceType: (t: string) => boolean;
  fhirBaseUrl: string;
  /** The SMTP relay of email channels (CUSTOS_SMTP_URL); without one, email subscriptions go to error. */
  mailer?: SmtpMailer;
  log: Logger;
  now?: () => Date;
}

/** Search errors that are the criteria's fault: the subscription goes to `error`. */
const CRITERIA_ERRORS = new Set<ErrorCode>([
  'SEARCH_INVALID',
  'SEARCH_UNKNOWN_PARAMETER',
  'SEARCH_PROTECTED',
  'SEARCH_TOO_COSTLY',
  'UNKNOWN_RESOURCE_TYPE',
  'FORBIDDEN_SCOPE',
  'PURPOSE_NOT_ALLOWED',
]);
const UNREGISTERED =
  'channel.endpoint is not a registered vendor endpoint (host, port and protocol): an administrator registers it (custos vendor endpoint), then set status to requested again.';
const NO_MAILER =
  'E-mail notifications are off on this server: an administrator sets CUSTOS_SMTP_URL and CUSTOS_SMTP_FROM, then set status to requested again.';
const RECIPIENT_NOT_ALLOWED =
  "E-mail that carries PHI (id-only, full-resource) goes only to the domains an administrator lists in CUSTOS_SMTP_RECIPIENT_DOMAINS, and this address's domain is not one of them: use no payload, or ask for the domain to be listed; then set status to requested again.";
const RELAY_UNREGISTERED =
  'The SMTP relay (CUSTOS_SMTP_URL) is not a registered vendor endpoint with protocol tls: an administrator registers it (custos vendor endpoint), then set status to requested again.';
/** The version to notify cannot be read (deleted, key destroyed): a dead letter at once. */
const UNREADABLE = 'resource version not readable';
type Outcome = { ok: true } | { ok: false; error: string; refused: boolean };
/** Ids per matching search (the `_id` list). */
const ID_CHUNK = 100;

function validateOptions(o: SubscriptionWorkerOptions): SubscriptionWorkerOptions {
  const positive: (keyof SubscriptionWorkerOptions)[] = [
    'pollMs',
    'batchSize',
    'maxAttempts',
    'retryBaseMs',
    'retryMaxMs',
    'requestTimeoutMs',
    'concurrency',
    'refusalsBeforeError',
    'deliveredRetentionMs',
  ];
  for (const k of positive) {
    const v = o[k];
    if (typeof v !== 'number' || !Number.isFinite(v) || v < 1)
      throw new TypeError(`subscription option ${k} must be a positive number`);
  }
  if (o.retryMaxMs < o.retryBaseMs)
    throw new TypeError('subscription option retryMaxMs is below retryBaseMs');
  return Object.freeze({ ...o });
}

/** The delay before attempt `attempts + 1`, with ±20% jitter so that retries of an outage spread. */
export function backoffMs(
  attempts: number,
  o: Pick<SubscriptionWorkerOptions, 'retryBaseMs' | 'retryMaxMs'>,
) {
  const raw = Math.min(o.retryBaseMs * 2 ** Math.max(0, attempts - 1), o.retryMaxMs);
  return Math.round(raw * (0.8 + Math.random() * 0.4));
}

export class SubscriptionWorker {
  readonly options: SubscriptionWorkerOptions;
  readonly queue: SubscriptionQueue;
  readonly #deps: SubscriptionWorkerDeps;
  /** Active subscriptions by project, then id (from the gateway; refreshed on Subscription changes). */
  readonly #active = new Map<string, Map<string, SubscriptionSpec>>();
  readonly #coverage = new TtlCache<string, { kind: 'sandbox' | 'production'; services: string[] }>(1_000);
  readonly #abort = new AbortController();
  readonly #inflight = new Set<Promise<void>>();
  #loops: Promise<void>[] = [];
  #started = false;
  #lastPrune = 0;
  /** Wakes the delivery loop early (new deliveries queued). */
  #wake: (() => void) | undefined;
  /** Set when deliveries were queued after the delivery loop last claimed: it does not sleep then. */
  #kick = false;

  constructor(deps: SubscriptionWorkerDeps, options: Partial<SubscriptionWorkerOptions> = {}) {
    this.#deps = deps;
    this.options = validateOptions({ ...DEFAULT_SUBSCRIPTION_OPTIONS, ...options });
    this.queue = new SubscriptionQueue(deps.db);
  }

  private now(): Date {
    return this.#deps.now?.() ?? new Date();
  }

  /** Starts the change-feed and delivery loops. */
  start(): void {
    if (this.#started) return;
    this.#started = true;
    const ready = this.loadAll().catch((e) =>
      this.#deps.log.error('subscription.load_failed', errorFields(e)),
    );
    this.#loops = [this.loop('detect', ready), this.loop('deliver', ready)];
  }

  /** Stops both loops and waits for notifications in flight to settle (they are aborted). */
  async stop(): Promise<void> {
    this.#abort.abort();
    this.#wake?.();
    await Promise.allSettled(this.#loops);
    await Promise.allSettled([...this.#inflight]);
  }

  private get stopped(): boolean {
    return this.#abort.signal.aborted;
  }

  /** Sleeps `ms`, or less when stopped or (`wakeable`) when new notifications are queued. */
  private async pause(ms: number, wakeable = false): Promise<void> {
    if (wakeable && this.#kick) return;
    await new Promise<void>((resolve) => {
      const done = () => {
        clearTimeout(t);
        this.#abort.signal.removeEventListener('abort', done);
        if (this.#wake === done) this.#wake = undefined;
        resolve();
      };
      const t = setTimeout(done, ms);
      this.#abort.signal.addEventListener('abort', done, { once: true });
      if (wakeable) this.#wake = done;
    });
  }

  private async loop(kind: 'detect' | 'deliver', ready: Promise<unknown>): Promise<void> {
    await ready;
    let failures = 0;
    while (!this.stopped) {
      let busy = false;
      try {
        busy = kind === 'detect' ? await this.detectOnce() : await this.deliverOnce();
        failures = 0;
      } catch (e) {
        if (this.stopped) break;
        failures++;
        this.#deps.log.error(`subscription.${kind}_failed`, errorFields(e));
      }
      if (this.stopped) break;
      if (failures > 0) await this.pause(Math.min(this.options.pollMs * 2 ** failures, 30_000));
      else if (!busy)
        await (kind === 'detect'
          ? this.pause(this.options.pollMs)
          : this.pause(await this.idleDelay(), true));
    }
  }

  // ---- subscriptions: loaded through the gateway, activated there ----------------------------

  /** A system principal of `projectId`: read and search everything, update Subscriptions. */
  private principal(projectId: string): Principal {
    const purpose = this.options.purpose;
    return {
      projectId,
      clientId: SUBSCRIPTION_CLIENT_ID,
      roles: ['system'],
      allowedPurposes: [purpose],
      mayBreakGlass: false,
      tokenPurpose: purpose,
      can: (type, i) => i === 'r' || i === 's' || (type === 'Subscription' && i === 'u'),
    };
  }

  private session(projectId: string, requestId = newId()) {
    return this.#deps.gateway.session(this.principal(projectId), { requestId });
  }

  /** Every project holding a Subscription (metadata only), each loaded. */
  private async loadAll(): Promise<void> {
    const r = await this.#deps.db.query<{ project_id: string }>(
      `SELECT DISTINCT project_id FROM resource WHERE resource_type = 'Subscription' AND NOT deleted`,
    );
    for (const { project_id } of r.rows) await this.loadProject(project_id);
  }

  /** Reads the project's requested and active Subscriptions; activates (or refuses) requested ones. */
  private async loadProject(projectId: string): Promise<void> {
    const res = await this.session(projectId).search(this.#deps.fhirBaseUrl, {
      type: 'Subscription',
      query: new URLSearchParams({ status: 'requested,active', _count: '1000' }),
      strict: true,
      path: '/Subscription',
    });
    const active = new Map<string, SubscriptionSpec>();
    for (const resource of matchedResources(res.body)) {
      const id = String(resource.id);
      try {
        const spec = parseSubscription(projectId, resource, this.#deps.isResourceType);
        if (spec.status === 'requested') {
          await this.activate(spec, resource);
          continue; // its update comes back through the change feed and is loaded then
        }
        // `active` written by a client rather than by activation: the endpoint is checked all the same.
        const problem = await this.endpointProblem(spec);
        if (problem) {
          await this.setStatus(projectId, resource, 'error', problem);
          continue;
        }
        active.set(id, spec);
      } catch (e) {
        if (!(e instanceof SubscriptionRefusal)) throw e;
        await this.setStatus(projectId, resource, 'error', e.message);
      }
    }
    if (active.size > 0) this.#active.set(projectId, active);
    else this.#active.delete(projectId);
  }

  /**
   * Whether the project's BAAs cover the channel's service, when the payload carries PHI and the
   * project is production. Read afresh at activation; before each attempt, at most every 5 s
   * per project: recording a BAA turns a sandbox into production under running subscriptions.
   */
  private async channelCovered(spec: SubscriptionSpec, fresh = false): Promise<boolean> {
    if (spec.dataClass === 'none') return true;
    let project = fresh ? undefined : this.#coverage.get(spec.projectId);
    if (!project) {
      project = (await projectCoverage(this.#deps.db, spec.projectId)) ?? { kind: 'sandbox', services: [] };
      this.#coverage.set(spec.projectId, project, Date.now() + 5_000);
    }
    return project.kind !== 'production' || project.services.includes(CHANNEL_SERVICE[spec.channel]);
  }

  /** The active subscriptions per project, channel and destination host and port (the flow map). */
  activeFlows(): SubscriptionFlow[] {
    const out = new Map<string, SubscriptionFlow>();
    const relay = this.#deps.mailer?.relay;
    for (const [projectId, specs] of this.#active)
      for (const s of specs.values()) {
        const dest =
          s.channel === 'email'
            ? relay && { host: normalizeHost(relay.host) ?? relay.host, port: relay.port }
            : {
                host: normalizeHost(s.endpoint.hostname) ?? s.endpoint.hostname,
                port: s.endpoint.port ? Number(s.endpoint.port) : s.endpoint.protocol === 'https:' ? 443 : 80,
              };
        if (!dest) continue;
        const key = `${projectId}|${s.channel}|${dest.host}|${dest.port}`;
        const f = out.get(key) ?? { projectId, channel: s.channel, ...dest, count: 0, phi: 0 };
        f.count++;
        if (s.dataClass !== 'none') f.phi++;
        out.set(key, f);
      }
    return [...out.values()];
  }

  /**
   * Why the subscription cannot be delivered to, if it cannot: a rest-hook endpoint must be a
   * registered vendor endpoint (host, port, protocol); an email channel needs the SMTP relay,
   * registered as a vendor endpoint with protocol tls. (The BAA and the class are checked at each
   * delivery by the egress gateway.)
   */
  private async endpointProblem(spec: SubscriptionSpec): Promise<string | undefined> {
    // A production project's PHI leaves by a channel only if the project's BAA covers it.
    if (!(await this.channelCovered(spec, true))) {
      const service = CHANNEL_SERVICE[spec.channel];
      return `The project's BAA does not cover the service ${service}: notifications that carry PHI (id-only, full-resource) need it. An administrator records a BAA covering ${service} (custos project baa), or use no payload; then set status to requested again.`;
    }
    if (spec.channel === 'email') {
      const mailer = this.#deps.mailer;
      if (!mailer) return NO_MAILER;
      if (!mailer.recipientAllowed(spec.to!, spec.dataClass)) return RECIPIENT_NOT_ALLOWED;
      const d = await this.#deps.vendors.find(normalizeHost(mailer.relay.host) ?? '', mailer.relay.port);
      return d !== undefined && d.protocol === 'tls' && d.kind === 'vendor' ? undefined : RELAY_UNREGISTERED;
    }
    const scheme = spec.endpoint.protocol === 'https:' ? 'https' : 'http';
    const host = normalizeHost(spec.endpoint.hostname);
    const port = spec.endpoint.port ? Number(spec.endpoint.port) : scheme === 'https' ? 443 : 80;
    const d = host ? await this.#deps.vendors.find(host, port) : undefined;
    return d !== undefined && d.protocol === scheme && d.kind === 'vendor' ? undefined : UNREGISTERED;
  }

  /** Requested → active when the endpoint is a registered vendor endpoint and the criteria search runs. */
  private async activate(spec: SubscriptionSpec, resource: Record<string, unknown>): Promise<void> {
    const problem = await this.endpointProblem(spec);
    if (problem) {
      await this.setStatus(spec.projectId, resource, 'error', problem);
      return;
    }
    try {
      await this.match(spec, [newId()]);
    } catch (e) {
      if (!isCustosError(e) || !CRITERIA_ERRORS.has(e.code)) throw e;
      await this.setStatus(spec.projectId, resource, 'error', `criteria: ${ERROR_CATALOG[e.code].message}`);
      return;
    }
    await this.queue.healthy(spec.projectId, spec.id);
    await this.setStatus(spec.projectId, resource, 'active', undefined);
  }

  /** Writes the Subscription's status through the gateway, unless it changed meanwhile. */
  private async setStatus(
    projectId: string,
    resource: Record<string, unknown>,
    status: 'active' | 'error',
    error: string | undefined,
  ): Promise<void> {
    const next: Record<string, unknown> = { ...resource, status };
    if (error === undefined) delete next.error;
    else next.error = error;
    const versionId = Number((resource.meta as { versionId?: unknown } | undefined)?.versionId);
    try {
      await this.session(projectId).update('Subscription', String(resource.id), next, {
        ifMatch: Number.isInteger(versionId) ? versionId : undefined,
      });
      this.#deps.log.info(status === 'active' ? 'subscription.activated' : 'subscription.error', {
        resourceType: 'Subscription',
        resourceId: String(resource.id),
      });
    } catch (e) {
      // Changed since it was read: the newer version comes through the change feed.
      if (isCustosError(e) && e.code === 'VERSION_CONFLICT') return;
      throw e;
    }
  }

  private async errorSubscription(spec: SubscriptionSpec, error: string): Promise<void> {
    const res = await this.session(spec.projectId).read('Subscription', spec.id);
    const json = res.version?.json;
    if (json) {
      const resource = JSON.parse(json) as Record<string, unknown>;
      if (resource.status === 'active') await this.setStatus(spec.projectId, resource, 'error', error);
    }
    this.#active.get(spec.projectId)?.delete(spec.id);
  }

  // ---- detection --------------------------------------------------------------------------

  /** The ids among `ids` that match now, each with the patients of its compartment. */
  private async match(spec: SubscriptionSpec, ids: string[]): Promise<Map<string, string[]>> {
    const query = new URLSearchParams(spec.query);
    query.set('_id', ids.join(','));
    query.set('_count', String(ids.length));
    const res = await this.session(spec.projectId).search(this.#deps.fhirBaseUrl, {
      type: spec.type,
      query,
      strict: true,
      path: `/${spec.type}`,
    });
    return new Map(
      matchedResources(res.body).map((r) => [
        String(r.id),
        patientCompartment(r as { resourceType: string; id?: string }),
      ]),
    );
  }

  /** One round of the change feed; true when it found changes (read again at once). */
  private async detectOnce(): Promise<boolean> {
    const changes = await this.queue.changes(this.options.batchSize);
    if (changes.length === 0) return false;
    const changedSubscriptions = new Set(
      changes.filter((c) => c.resourceType === 'Subscription').map((c) => c.projectId),
    );
    for (const p of changedSubscriptions) await this.loadProject(p);
    const now = this.now().getTime();
    const matches: Parameters<SubscriptionQueue['enqueue']>[0] = [];
    const byProject = new Map<string, Change[]>();
    for (const c of changes) {
      if (c.deleted || c.resourceType === 'Subscription') continue;
      if (!this.#active.has(c.projectId)) continue;
      const list = byProject.get(c.projectId) ?? [];
      list.push(c);
      byProject.set(c.projectId, list);
    }
    for (const [projectId, list] of byProject) {
      for (const spec of [...(this.#active.get(projectId)?.values() ?? [])]) {
        if (spec.end !== undefined && spec.end <= now) continue;
        const rows = list.filter((c) => c.resourceType === spec.type);
        const ids = [...new Set(rows.map((c) => c.id))];
        const matched = new Map<string, string[]>();
        try {
          for (let i = 0; i < ids.length; i += ID_CHUNK)
            for (const [id, patients] of await this.match(spec, ids.slice(i, i + ID_CHUNK)))
              matched.set(id, patients);
        } catch (e) {
          if (!isCustosError(e) || !CRITERIA_ERRORS.has(e.code)) throw e;
          await this.errorSubscription(spec, `criteria: ${ERROR_CATALOG[e.code].message}`);
          continue;
        }
        for (const c of rows)
          if (matched.has(c.id))
            matches.push({
              projectId,
              subscriptionId: spec.id,
              resourceType: c.resourceType,
              id: c.id,
              versionId: c.versionId,
              patients: matched.get(c.id)!,
            });
      }
    }
    const queued = await this.queue.enqueue(matches, changes[changes.length - 1]!, this.now());
    if (queued > 0) {
      this.#kick = true;
      this.#wake?.();
    }
    return true;
  }

  // ---- delivery ---------------------------------------------------------------------------

  private async idleDelay(): Promise<number> {
    const due = await this.queue.nextDue();
    if (due === undefined) return this.options.pollMs;
    return Math.max(0, Math.min(this.options.pollMs, due - this.now().getTime()));
  }

  /** Claims due notifications up to the concurrency limit and starts them; true when any started. */
  private async deliverOnce(): Promise<boolean> {
    this.#kick = false;
    const t = this.now();
    if (t.getTime() - this.#lastPrune > 3_600_000) {
      this.#lastPrune = t.getTime();
      await this.queue.prune(new Date(t.getTime() - this.options.deliveredRetentionMs));
    }
    const free = this.options.concurrency - this.#inflight.size;
    if (free <= 0) {
      await Promise.race(this.#inflight);
      return true;
    }
    // The claim outlives the longest attempt: a worker that dies mid-send lets it expire and resend.
    const claimed = await this.queue.claim(free, t, this.options.requestTimeoutMs * 3 + 5_000);
    for (const d of claimed) {
      const p = this.deliver(d).catch((e) =>
        this.#deps.log.error('subscription.deliver_failed', errorFields(e)),
      );
      this.#inflight.add(p);
      void p.finally(() => this.#inflight.delete(p));
    }
    return claimed.length > 0;
  }

  /** One attempt of one notification. */
  private async deliver(d: Delivery): Promise<void> {
    const spec = this.#active.get(d.projectId)?.get(d.subscriptionId);
    if (!spec) {
      await this.queue.failed(d.id, 'subscription not active', undefined, this.now());
      return;
    }
    let outcome: Outcome;
    try {
      outcome = !(await this.channelCovered(spec))
        ? { ok: false, error: 'PROJECT_BAA_NOT_COVERED', refused: true }
        : spec.channel === 'email'
          ? await this.mail(spec, d)
          : await this.post(spec, d);
      if (!outcome.ok && outcome.error === UNREADABLE) {
        await this.queue.failed(d.id, UNREADABLE, undefined, this.now());
        return;
      }
    } catch (e) {
      if (this.stopped) {
        // Stopping: not an attempt; due again at once for the next start (it may have arrived: at least once).
        await this.queue.release(d.id, this.now()).catch(() => {});
        return;
      }
      const refused = isCustosError(e) && e.code.startsWith('EGRESS_');
      outcome = { ok: false, error: failureCode(e), refused };
    }
    await this.settle(spec, d, outcome);
  }

  /** A rest-hook attempt: the HTTP request through the egress gateway; a 2xx answer is delivered. */
  private async post(spec: SubscriptionSpec, d: Delivery): Promise<Outcome> {
    const req = await this.request(spec, d);
    if (!req) return { ok: false, error: UNREADABLE, refused: false };
    const res = await egressFetch(this.#deps.egress, {
      purpose: SUBSCRIPTION_EGRESS_PURPOSE,
      dataClass: spec.dataClass,
      url: req.url,
      init: {
        method: req.method,
        headers: req.headers,
        body: req.body,
        // A redirect is a failed attempt: a POST turned into a GET must not count as delivered.
        redirect: 'manual',
        signal: AbortSignal.any([this.#abort.signal, AbortSignal.timeout(this.options.requestTimeoutMs)]),
      },
      requestId: d.id,
      projectId: d.projectId,
      ...this.disclosed(spec, d),
    });
    await res.body?.cancel().catch(() => {});
    return res.ok ? { ok: true } : { ok: false, error: `HTTP ${res.status}`, refused: false };
  }

  /**
   * Whose data a notification discloses, for its egress audit event (access reports, the accounting
   * of disclosures): the patients of the resource's compartment, under the worker's purpose of use.
   * An empty notification (class none) names no resource, so it discloses nobody's data.
   */
  private disclosed(spec: SubscriptionSpec, d: Delivery): { patients?: string[]; purposeOfUse?: string } {
    if (spec.dataClass === 'none') return {};
    return { patients: d.patients, purposeOfUse: this.options.purpose };
  }

  /** An email attempt: one message through the SMTP relay (egress gateway); accepted is delivered. */
  private async mail(spec: SubscriptionSpec, d: Delivery): Promise<Outcome> {
    const mailer = this.#deps.mailer;
    if (!mailer) return { ok: false, error: 'EMAIL_OFF', refused: true };
    // Checked again at each send: the list may have shrunk since activation (a restart).
    if (!mailer.recipientAllowed(spec.to!, spec.dataClass))
      return { ok: false, error: 'EMAIL_RECIPIENT_NOT_ALLOWED', refused: true };
    const message = await this.message(spec, d);
    if (!message) return { ok: false, error: UNREADABLE, refused: false };
    try {
      await mailer.send(message, {
        purpose: SUBSCRIPTION_EGRESS_PURPOSE,
        dataClass: spec.dataClass,
        requestId: d.id,
        projectId: d.projectId,
        timeoutMs: this.options.requestTimeoutMs,
        signal: this.#abort.signal,
        recipient: recipientDomain(spec.to!),
        ...this.disclosed(spec, d),
      });
    } catch (e) {
      if (e instanceof SmtpError) return { ok: false, error: e.message, refused: false };
      throw e;
    }
    return { ok: true };
  }

  /** Records the outcome of one attempt: delivered, retried later, a dead letter, or a refusal run. */
  private async settle(spec: SubscriptionSpec, d: Delivery, outcome: Outcome): Promise<void> {
    const now = this.now();
    if (outcome.ok) {
      await this.queue.delivered(d.id, now);
      await this.queue.healthy(d.projectId, d.subscriptionId);
      this.#deps.log.debug('subscription.delivered', {
        resourceType: 'Subscription',
        resourceId: d.subscriptionId,
      });
      return;
    }
    const last = d.attempts >= this.options.maxAttempts;
    await this.queue.failed(
      d.id,
      outcome.error,
      last ? undefined : new Date(now.getTime() + backoffMs(d.attempts, this.options)),
      now,
    );
    this.#deps.log.warn(last ? 'subscription.dead_letter' : 'subscription.retry', {
      resourceType: 'Subscription',
      resourceId: d.subscriptionId,
      code: outcome.error,
      count: d.attempts,
    });
    if (outcome.refused) {
      const run = await this.queue.refused(d.projectId, d.subscriptionId, outcome.error, now);
      if (run >= this.options.refusalsBeforeError) {
        await this.errorSubscription(
          spec,
          `Notifications were refused by the egress gateway ${run} times in a row (${outcome.error}); pending notifications are dead letters. Fix the vendor registration or BAA, set status to requested, then replay them.`,
        );
        await this.queue.killPending(d.projectId, d.subscriptionId, outcome.error, now);
      }
    }
  }

  /**
   * The HTTP request of a notification (R4 rest-hook, https://hl7.org/fhir/R4/subscription.html and
   * the SubscriptionChannelType code system): empty: POST to the endpoint, no body; full-resource:
   * the endpoint is a service base and the resource is PUT to `[endpoint]/[type]/[id]`; id-only:
   * a POST of a history Bundle naming the version (the R5 backport's id-only shape, without its
   * R4B SubscriptionStatus entry). Undefined when the version cannot be read (deleted, key destroyed).
   */
  private async request(
    spec: SubscriptionSpec,
    d: Delivery,
  ): Promise<{ url: string; method: string; headers: [string, string][]; body?: string } | undefined> {
    const headers: [string, string][] = [
      ...spec.headers,
      [NOTIFICATION_ID_HEADER, d.id],
      [SUBSCRIPTION_ID_HEADER, d.subscriptionId],
    ];
    if (spec.payload === 'empty') return { url: spec.endpoint.href, method: 'POST', headers };
    if (spec.payload === 'id-only') {
      const ref = `${d.resourceType}/${d.resourceId}/_history/${d.versionId}`;
      const body = JSON.stringify({
        resourceType: 'Bundle',
        id: d.id,
        type: 'history',
        timestamp: this.now().toISOString(),
        entry: [{ request: { method: d.versionId === 1 ? 'POST' : 'PUT', url: ref } }],
      });
      return {
        url: spec.endpoint.href,
        method: 'POST',
        headers: [...headers, ['content-type', 'application/fhir+json']],
        body,
      };
    }
    const json = await this.readVersion(d);
    if (!json) return undefined;
    const base = spec.endpoint.href.replace(/\/+$/, '');
    return {
      url: `${base}/${d.resourceType}/${encodeURIComponent(d.resourceId)}`,
      method: 'PUT',
      headers: [...headers, ['content-type', 'application/fhir+json']],
      body: json,
    };
  }

  /** The notified version's JSON, read through the PHI gateway; undefined when it cannot be read. */
  private async readVersion(d: Delivery): Promise<string | undefined> {
    try {
      const r = await this.session(d.projectId, d.id).vread(
        d.resourceType,
        d.resourceId,
        String(d.versionId),
      );
      const json = r.status === 200 ? r.version?.json : undefined;
      // The version sent names its own patients (matching saw the current version, which may differ).
      if (json) d.patients = patientCompartment(JSON.parse(json) as { resourceType: string; id?: string });
      return json;
    } catch (e) {
      if (isCustosError(e) && (e.code === 'NOT_FOUND' || e.code === 'GONE' || e.code === 'KEY_DESTROYED'))
        return undefined;
      throw e;
    }
  }

  /**
   * The e-mail of a notification. Subject and text never carry more than the payload's class: empty
   * names the subscription and the server only; id-only adds the version's reference; full-resource
   * attaches the resource (application/fhir+json). Undefined when the version cannot be read.
   */
  private async message(spec: SubscriptionSpec, d: Delivery): Promise<MailMessage | undefined> {
    const lines = [
      `A resource matching Subscription/${spec.id} on ${this.#deps.fhirBaseUrl} has changed.`,
      '',
    ];
    const headers = { 'X-Custos-Notification-Id': d.id, 'X-Custos-Subscription-Id': spec.id };
    const subject = `Custos notification for Subscription/${spec.id}`;
    const ref = `${d.resourceType}/${d.resourceId}/_history/${d.versionId}`;
    if (spec.payload === 'empty') {
      lines.push('Sign in to the application that created the subscription to see what changed.');
      return { to: spec.to!, subject, text: lines.concat('', `Notification ${d.id}`).join('\n'), headers };
    }
    lines.push(`Resource: ${ref}`);
    if (spec.payload === 'id-only')
      return { to: spec.to!, subject, text: lines.concat('', `Notification ${d.id}`).join('\n'), headers };
    const json = await this.readVersion(d);
    if (!json) return undefined;
    lines.push('The resource is attached (application/fhir+json).');
    return {
      to: spec.to!,
      subject,
      text: lines.concat('', `Notification ${d.id}`).join('\n'),
      headers,
      attachments: [
        {
          filename: `${d.resourceType}-${d.resourceId}-${d.versionId}.json`,
          contentType: 'application/fhir+json',
          content: json,
        },
      ],
    };
  }
}

/** The `match` entries' resources of a search Bundle's JSON. */
function matchedResources(body: string | undefined): Record<string, unknown>[] {
  if (!body) return [];
  const bundle = JSON.parse(body) as {
    entry?: { resource?: Record<string, unknown>; search?: { mode?: string } }[];
  };
  return (bundle.entry ?? []).filter((e) => e.search?.mode === 'match' && e.resource).map((e) => e.resource!);
}

/** What is recorded of a failure: a code, never a message (a message could quote a URL or data). */
function failureCode(e: unknown): string {
  if (e instanceof CustosError) return e.code;
  const err = e as { name?: unknown; code?: unknown; cause?: { code?: unknown; name?: unknown } } | null;
  if (err?.name === 'TimeoutError' || err?.cause?.name === 'TimeoutError') return 'timeout';
  const code = err?.cause?.code ?? err?.code;
  if (typeof code === 'string' && /^[A-Z0-9_]{2,40}$/.test(code)) return code;
  return 'network error';
}
