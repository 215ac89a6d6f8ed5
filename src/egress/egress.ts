import { createHash, randomUUID } from 'node:crypto';
import { lookup as dnsLookup } from 'node:dns/promises';
import type { LookupAddress } from 'node:dns';
import { isIP, type Socket } from 'node:net';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { Agent, buildConnector, fetch as undiciFetch } from 'undici';
import { CustosError, type ErrorCode } from '../kernel/errors.ts';
import { newId } from '../kernel/ids.ts';
import { TtlCache } from '../kernel/ttl-cache.ts';
import type { Logger } from '../log/logger.ts';
import type { AuditEvent } from '../audit/audit-event.ts';
import { addressKind, normalizeHost } from './address-policy.ts';
import {
  classRefusal,
  StaticDestinations,
  type DataClass,
  type Destination,
  type DestinationSource,
  type Vendor,
} from './vendor-registry.ts';

/**
 * The egress gateway: the only way Custos code makes an outbound connection (webhooks, JWKS
 * fetches, the KMS, the SIEM, checkpoint witnesses, the CLI's calls to its own server). The lint
 * rule in eslint.config.js forbids every other outbound client in src (ADR 0009,
 * docs/phi-boundary.md).
 *
 * Each request names the class of data it carries (`full`, `limited`, `deidentified`, `none`) and
 * why it is made. Before anything is sent the gateway:
 * 1. finds the destination's host and port among the registered vendor endpoints (vendor-registry.ts)
 *    or the operator-configured infrastructure destinations; not there: refused;
 * 2. refuses a class above what the vendor may receive, and PHI (`full`, `limited`) to a vendor
 *    without an executed, unexpired BAA;
 * 3. resolves every A/AAAA record itself and refuses private, loopback, link-local and reserved
 *    addresses (IPv4-mapped and numeric forms included) unless that exact endpoint is registered
 *    with `allowPrivate`; then connects only to the addresses it checked (its own `lookup`), and
 *    checks the socket's remote address once more;
 * 4. requires TLS 1.2+ with the certificate verified; plain http only to an endpoint registered
 *    as `http` with `allowPrivate`, and only over private or loopback addresses;
 * 5. audits the attempt (action `egress`: vendor, endpoint host and port, data class, outcome; never
 *    a path or query) before sending, and a refusal before throwing it. If the audit log cannot
 *    take the record, nothing is sent.
 * Redirects are followed by hand (at most 5), each hop decided and audited as a new request.
 */

/** Looks up every A and AAAA record of a name (the system resolver by default). */
export type Resolver = (host: string) => Promise<string[]>;

const systemResolver: Resolver = async (host) =>
  (await dnsLookup(host, { all: true, verbatim: true })).map((a) => a.address);

/** Where the gateway writes its audit events (an AuditLog). */
export interface EgressAuditSink {
  append(event: AuditEvent): Promise<number>;
}

export interface EgressGatewayOptions {
  /** Registered vendors and infrastructure destinations (a VendorRegistry, or StaticDestinations). */
  destinations: DestinationSource;
  /** The audit log; without one (the CLI's `self` calls) attempts are only logged. */
  audit?: EgressAuditSink;
  log?: Logger;
  /** DNS (tests inject names that resolve to private addresses). */
  resolve?: Resolver;
  /** Connect and TLS handshake time limit (default 10 s). */
  connectTimeoutMs?: number;
  /** Told of each destination a request was allowed to (the registry logs BAA expiry warnings). */
  onAllowed?: (d: Destination) => void;
}

export interface EgressRequest {
  /** Why this request is made, a short code for the audit and the flow map, e.g. `audit-witness`. */
  purpose: string;
  /** The class of data the request (body, URL, headers) carries. */
  dataClass: DataClass;
  url: string;
  init?: RequestInit;
  /** PEM certificates to trust instead of Node's bundled roots (a private CA). */
  ca?: string | Buffer;
  /** For the audit event: the request that caused this one, and its project. */
  requestId?: string;
  projectId?: string;
  /** For the audit event: the patients whose data the request carries, and the purpose of use. */
  patients?: string[];
  purposeOfUse?: string;
  /** For the audit event: where the vendor passes the data on (an e-mail recipient's domain). */
  recipient?: string;
}

/** An outbound TLS stream (`egressConnectTls`). */
export interface EgressTlsRequest {
  /** Why this connection is made, e.g. `audit-siem`. */
  purpose: string;
  dataClass: DataClass;
  /** A DNS name or an IP address (IPv6 with or without brackets). */
  host: string;
  port: number;
  /** PEM certificates to trust instead of Node's bundled roots (a private CA). */
  ca?: string | Buffer;
  /** Client certificate chain and key (PEM), for mutual TLS. */
  cert?: string | Buffer;
  key?: string | Buffer;
  /** Gives up on the TCP connect and TLS handshake after this long (default 10 s). */
  timeoutMs?: number;
  /** Aborts the connect (the promise rejects with code `ABORT_ERR`). */
  signal?: AbortSignal;
  requestId?: string;
  projectId?: string;
  patients?: string[];
  purposeOfUse?: string;
  recipient?: string;
}

/** What the audit event of an egress attempt is made of. */
type AuditedRequest = Pick<
  EgressRequest,
  'purpose' | 'dataClass' | 'projectId' | 'patients' | 'purposeOfUse' | 'recipient'
>;

/** The redirects followed at most. */
export const MAX_REDIRECTS = 5;
const PURPOSE = /^[a-z0-9][a-z0-9-]{0,39}$/;
const REDIRECT_STATUSES = new Set([301, 302, 303, 307, 308]);
/** Headers that are not carried to another origin on a redirect. */
const CREDENTIAL_HEADERS = /^(authorization|cookie|proxy-authorization|x-custos-.*)$/i;

interface Decision {
  destination: Destination;
  host: string;
  addresses: string[];
}

function refusal(code: ErrorCode): CustosError {
  return new CustosError(code);
}

export class EgressGateway {
  readonly #opts: EgressGatewayOptions;
  readonly #resolve: Resolver;
  readonly #agents = new Map<string, Agent>();
  readonly #resolved = new TtlCache<string, string[]>(256);

  constructor(opts: EgressGatewayOptions) {
    this.#opts = opts;
    this.#resolve = opts.resolve ?? systemResolver;
  }

  /** A gateway that knows only the given vendors (infrastructure fallbacks, the CLI's `self`). */
  static of(
    vendors: readonly Vendor[],
    opts: Omit<EgressGatewayOptions, 'destinations'> = {},
  ): EgressGateway {
    return new EgressGateway({ ...opts, destinations: new StaticDestinations(vendors) });
  }

  /** Closes pooled connections. */
  async close(): Promise<void> {
    const agents = [...this.#agents.values()];
    this.#agents.clear();
    await Promise.all(agents.map((a) => a.close().catch(() => {})));
  }

  /**
   * `fetch` through the gateway. Refusals reject with a CustosError (`EGRESS_*`); nothing was sent.
   *
   * @example
   * const res = await gateway.fetch({ purpose: 'webhook', dataClass: 'full', url: hook.url,
   *   init: { method: 'POST', headers: { 'content-type': 'application/fhir+json' }, body } });
   */
  async fetch(req: EgressRequest): Promise<Response> {
    if (!PURPOSE.test(req.purpose)) throw new TypeError('egress purpose must be a short lower-case code');
    const requestId = req.requestId ?? newId();
    const init = req.init ?? {};
    const mode = init.redirect ?? 'follow';
    let method = (init.method ?? 'GET').toUpperCase();
    let body = init.body ?? undefined;
    const headers = new Headers(init.headers);
    let url: URL;
    try {
      url = new URL(req.url);
    } catch {
      throw new TypeError('egress: not a URL');
    }
    for (let hop = 0; ; hop++) {
      if (hop > MAX_REDIRECTS) {
        await this.audit(
          req,
          requestId,
          hop,
          'refused',
          'EGRESS_TOO_MANY_REDIRECTS',
          undefined,
          hostOf(url),
          port(url),
        );
        throw refusal('EGRESS_TOO_MANY_REDIRECTS');
      }
      const scheme = url.protocol === 'https:' ? 'https' : url.protocol === 'http:' ? 'http' : undefined;
      if (!scheme || url.username || url.password) {
        await this.audit(
          req,
          requestId,
          hop,
          'refused',
          'EGRESS_INSECURE',
          undefined,
          hostOf(url),
          port(url),
        );
        throw refusal('EGRESS_INSECURE');
      }
      const d = await this.decide(req, requestId, hop, scheme, url.hostname, port(url));
      this.#opts.log?.info('egress.request', { code: req.purpose, host: d.host });
      const res = (await undiciFetch(url, {
        method,
        headers: [...headers],
        body: body as never,
        signal: init.signal ?? undefined,
        redirect: 'manual',
        dispatcher: this.agent(d.destination, req.ca),
      })) as unknown as Response;
      const location = res.headers.get('location');
      if (!REDIRECT_STATUSES.has(res.status) || location === null || mode === 'manual') return res;
      await res.body?.cancel().catch(() => {});
      if (mode === 'error') throw new TypeError('egress: redirect refused by the caller (redirect: error)');
      let next: URL;
      try {
        next = new URL(location, url);
      } catch {
        throw new TypeError('egress: the redirect location is not a URL');
      }
      // As fetch does (WHATWG Fetch, "HTTP-redirect fetch"): 303, and 301/302 after POST, become GET.
      if (
        res.status === 303
          ? method !== 'HEAD'
          : (res.status === 301 || res.status === 302) && method === 'POST'
      ) {
        method = 'GET';
        body = undefined;
        headers.delete('content-type');
        headers.delete('content-length');
      } else if (body instanceof ReadableStream) {
        throw new TypeError('egress: cannot replay a streamed body on a redirect');
      }
      if (next.origin !== url.origin)
        for (const name of [...headers.keys()]) if (CREDENTIAL_HEADERS.test(name)) headers.delete(name);
      url = next;
    }
  }

  /**
   * Opens a TLS stream to a registered `tls` endpoint once the handshake has succeeded: TLS 1.2 or
   * newer, the certificate verified against `ca` (or Node's roots) and the host name or address
   * (SNI set for names; RFC 6066 forbids it for addresses). Refusals reject with a CustosError;
   * connection failures with the socket's error (`ECONNREFUSED`, `ETIMEDOUT`,
   * `UNABLE_TO_VERIFY_LEAF_SIGNATURE`, `ERR_TLS_CERT_ALTNAME_INVALID`, `ABORT_ERR`, …).
   */
  async connectTls(req: EgressTlsRequest): Promise<TLSSocket> {
    if (!PURPOSE.test(req.purpose)) throw new TypeError('egress purpose must be a short lower-case code');
    const requestId = req.requestId ?? newId();
    const d = await this.decide(req, requestId, 0, 'tls', req.host, req.port);
    this.#opts.log?.info('egress.connect', { code: req.purpose, host: d.host, port: req.port });
    return new Promise((resolve, reject) => {
      const abort = () => fail(Object.assign(new Error('TLS connect aborted'), { code: 'ABORT_ERR' }));
      const socket = tlsConnect({
        host: d.host,
        port: req.port,
        servername: isIP(d.host) === 0 ? d.host : undefined,
        lookup: this.lookupFor(d.destination),
        ca: req.ca,
        cert: req.cert,
        key: req.key,
        minVersion: 'TLSv1.2',
        rejectUnauthorized: true,
      });
      const fail = (e: Error) => {
        req.signal?.removeEventListener('abort', abort);
        socket.on('error', () => {}); // a late second error of a socket given up on
        socket.destroy();
        reject(e);
      };
      socket.setTimeout(req.timeoutMs ?? this.#opts.connectTimeoutMs ?? 10_000, () =>
        fail(Object.assign(new Error('TLS connect timed out'), { code: 'ETIMEDOUT' })),
      );
      if (req.signal?.aborted) abort();
      req.signal?.addEventListener('abort', abort, { once: true });
      socket.once('error', fail);
      socket.once('secureConnect', () => {
        socket.setTimeout(0);
        socket.off('error', fail);
        req.signal?.removeEventListener('abort', abort);
        // rejectUnauthorized already refused an unverified peer; this only makes the rule explicit.
        if (!socket.authorized) {
          fail(Object.assign(new Error('TLS peer not authorized'), { code: 'ERR_TLS_NOT_AUTHORIZED' }));
          return;
        }
        if (!this.addressAllowed(d.destination, socket.remoteAddress)) {
          fail(refusal('EGRESS_PRIVATE_ADDRESS'));
          return;
        }
        resolve(socket);
      });
    });
  }

  /** The checks of one hop; audits the outcome; throws the refusal. */
  private async decide(
    req: AuditedRequest,
    requestId: string,
    hop: number,
    scheme: 'https' | 'http' | 'tls',
    rawHost: string,
    port: number,
  ): Promise<Decision> {
    const host = normalizeHost(rawHost);
    const refuse = async (code: ErrorCode, d?: Destination): Promise<never> => {
      await this.audit(req, requestId, hop, 'refused', code, d, host ?? 'invalid', port);
      this.#opts.log?.warn('egress.refused', { code, host: host ?? undefined, port });
      throw refusal(code);
    };
    if (!host) return refuse('EGRESS_DESTINATION_UNREGISTERED');
    const d = await this.#opts.destinations.find(host, port);
    if (!d) return refuse('EGRESS_DESTINATION_UNREGISTERED');
    if (d.protocol !== scheme) {
      // A registered https or tls endpoint asked for in plain http: insecure; anything else: not this endpoint.
      return refuse(scheme === 'http' ? 'EGRESS_INSECURE' : 'EGRESS_DESTINATION_UNREGISTERED', d);
    }
    // The class and BAA rules, shared with the flow map's coverage (vendor-registry.ts).
    const classRefused = classRefusal(d, req.dataClass);
    if (classRefused) return refuse(classRefused, d);
    let addresses: string[];
    try {
      addresses = await this.resolveChecked(d, host);
    } catch (e) {
      if (e instanceof CustosError) return refuse(e.code, d);
      const errno = (e as { code?: unknown }).code;
      await this.audit(
        req,
        requestId,
        hop,
        'failed',
        typeof errno === 'string' ? errno : 'ENOTFOUND',
        d,
        host,
        port,
      );
      throw e;
    }
    await this.audit(req, requestId, hop, 'success', 'egress.allowed', d, host, port);
    this.#opts.onAllowed?.(d);
    return { destination: d, host, addresses };
  }

  /** Every address of `host`, each checked for `d`; throws a refusal for the first one not allowed. */
  private async resolveChecked(d: Destination, host: string): Promise<string[]> {
    let addresses: string[];
    if (isIP(host) !== 0) addresses = [host];
    else {
      const cached = this.#resolved.get(host);
      addresses = cached ?? (await this.#resolve(host));
      if (!cached) this.#resolved.set(host, addresses, Date.now() + 5_000);
    }
    if (addresses.length === 0) throw Object.assign(new Error('no address'), { code: 'ENOTFOUND' });
    for (const a of addresses) {
      if (!this.addressAllowed(d, a))
        throw refusal(
          d.protocol === 'http' && addressKind(a) === 'public' ? 'EGRESS_INSECURE' : 'EGRESS_PRIVATE_ADDRESS',
        );
    }
    return addresses;
  }

  private addressAllowed(d: Destination, address: string | undefined): boolean {
    if (!address) return false;
    const kind = addressKind(address);
    if (kind === undefined) return false;
    // Plain text never crosses a public network.
    if (d.protocol === 'http') return d.allowPrivate && kind !== 'public';
    return kind === 'public' || d.allowPrivate;
  }

  /** A `lookup` for net/tls.connect that returns only addresses checked for `d`. */
  private lookupFor(d: Destination) {
    return (
      hostname: string,
      options: { all?: boolean; family?: number | string },
      cb: (err: Error | null, address: string | LookupAddress[], family?: number) => void,
    ) => {
      this.resolveChecked(d, normalizeHost(hostname) ?? hostname).then(
        (addresses) => {
          const list = addresses.map((address) => ({ address, family: isIP(address) }));
          if (options.all) cb(null, list);
          else cb(null, list[0]!.address, list[0]!.family);
        },
        (e: Error) => cb(e, []),
      );
    };
  }

  /** One connection pool per endpoint (and trusted CA), connecting only to checked addresses. */
  private agent(d: Destination, ca: string | Buffer | undefined): Agent {
    const key = `${d.vendorId}|${d.endpointId}|${ca ? createHash('sha256').update(ca).digest('hex') : ''}`;
    let agent = this.#agents.get(key);
    if (!agent) {
      const base = buildConnector({
        ca,
        minVersion: 'TLSv1.2',
        rejectUnauthorized: true,
        lookup: this.lookupFor(d) as never,
        timeout: this.#opts.connectTimeoutMs ?? 10_000,
      });
      agent = new Agent({
        connect: (opts, cb) =>
          base(opts, (err, socket) => {
            if (err || !socket) return cb(err ?? new Error('no socket'), null);
            // The address actually connected to, whatever resolved it.
            if (!this.addressAllowed(d, (socket as Socket).remoteAddress)) {
              socket.destroy();
              return cb(refusal('EGRESS_PRIVATE_ADDRESS'), null);
            }
            cb(null, socket);
          }),
      });
      this.#agents.set(key, agent);
    }
    return agent;
  }

  private async audit(
    req: AuditedRequest,
    requestId: string,
    hop: number,
    outcome: 'success' | 'refused' | 'failed',
    code: string,
    d: Destination | undefined,
    host: string,
    port: number,
  ): Promise<void> {
    // Allowed requests carrying nothing to infrastructure (KMS calls, witness submissions) are
    // logged, not audited: a witness submission audited would grow the log it witnesses at every
    // checkpoint interval (ADR 0009). Everything else is audited.
    const sink = this.#opts.audit;
    if (!sink) return;
    if (outcome === 'success' && req.dataClass === 'none' && d && d.kind !== 'vendor') return;
    const event: AuditEvent = {
      v: 1,
      id: randomUUID(),
      time: new Date().toISOString(),
      phase: 'access',
      action: 'egress',
      outcome,
      code,
      requestId,
      projectId: req.projectId,
      purpose: req.purposeOfUse,
      patients: req.patients?.length ? [...req.patients] : undefined,
      actor: { roles: ['custos'] },
      resource: d ? { type: 'Vendor', id: d.vendorId } : undefined,
      source: {},
      egress: {
        vendorId: d?.vendorId,
        endpointId: d?.endpointId,
        host: host.slice(0, 253),
        port,
        dataClass: req.dataClass,
        purpose: req.purpose,
        hop,
        ...(req.recipient ? { recipient: req.recipient.slice(0, 253) } : {}),
      },
    };
    try {
      await sink.append(event);
    } catch {
      // Fail closed: no audit record, nothing sent.
      throw new CustosError('AUDIT_UNAVAILABLE');
    }
  }
}

function hostOf(u: URL): string {
  return normalizeHost(u.hostname) ?? 'invalid';
}

function port(u: URL): number {
  return u.port ? Number(u.port) : u.protocol === 'http:' ? 80 : 443;
}

/** `gateway.fetch(req)`: see EgressGateway. */
export function egressFetch(gateway: EgressGateway, req: EgressRequest): Promise<Response> {
  return gateway.fetch(req);
}

/** `gateway.connectTls(req)`: see EgressGateway. */
export function egressConnectTls(gateway: EgressGateway, req: EgressTlsRequest): Promise<TLSSocket> {
  return gateway.connectTls(req);
}
