import type { DataClass } from '../egress/vendor-registry.ts';

/**
 * What a FHIR R4 `Subscription` asks for, read and checked (https://hl7.org/fhir/R4/subscription.html):
 * the criteria (a search string), the rest-hook channel (endpoint, headers) and the payload, mapped
 * to the data class the egress gateway is told it carries (docs/phi-boundary.md, "Subscriptions").
 *
 * Payload choices and their classes:
 * - no `channel.payload`: an **empty** notification, a POST with no body: class `none` (it carries
 *   no identifier and no health data; the subscriber learns that something matching its own
 *   criteria changed);
 * - `channel.payload` `application/fhir+json` with the backport extension
 *   (`…/backport-payload-content`) `id-only`: a POST of a Bundle naming the resource type, id and
 *   version, no content: class `limited` (a record locator of a patient's data tied to a clinical
 *   event is PHI, though it carries none of the direct identifiers of 45 CFR 164.514(e)(2));
 * - `application/fhir+json` without it, or with `full-resource`: the resource itself, PUT to
 *   `[endpoint]/[type]/[id]` as R4 specifies for a rest-hook with a payload: class `full`;
 * - the extension with `empty`: as without a payload.
 *
 * The email channel (`channel.type` email, `channel.endpoint` `mailto:` and one address) carries
 * the same three choices as a message through the configured SMTP relay (egress/smtp-mailer.ts):
 * empty, a subject and a text naming the subscription only (class `none`); id-only, the text names
 * the resource version (`limited`); full-resource, the resource attached as application/fhir+json
 * (`full`). The relay is the vendor whose BAA must cover the class.
 */

export type PayloadContent = 'empty' | 'id-only' | 'full-resource';

/** The R5 backport IG's extension on `Subscription.channel.payload` that picks the content. */
export const PAYLOAD_CONTENT_EXTENSION =
  'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content';

export const PAYLOAD_CLASS: Readonly<Record<PayloadContent, DataClass>> = {
  empty: 'none',
  'id-only': 'limited',
  'full-resource': 'full',
};

/** A checked, active-able subscription. */
export interface SubscriptionSpec {
  projectId: string;
  id: string;
  versionId: number;
  status: string;
  /** The resource type of the criteria. */
  type: string;
  /** The criteria's query (parameters after `?`). */
  query: URLSearchParams;
  /** rest-hook: an HTTP(S) endpoint; email: a message through the SMTP relay to `to`. */
  channel: 'rest-hook' | 'email';
  /** rest-hook: the URL; email: `mailto:<to>`. */
  endpoint: URL;
  /** email: the one recipient address (lower case). */
  to?: string;
  headers: [string, string][];
  payload: PayloadContent;
  dataClass: DataClass;
  /** `Subscription.end` in ms since the epoch, when set. */
  end?: number;
}

/** Search result parameters that make no sense in a criteria: refused. */
const RESULT_PARAMETERS = new Set([
  '_count',
  '_sort',
  '_include',
  '_revinclude',
  '_elements',
  '_summary',
  '_total',
  '_contained',
  '_containedType',
  '_cursor',
  '_id',
  '_format',
  '_pretty',
]);
/** Headers a subscriber may not set: the gateway and the notification own them. */
const RESERVED_HEADERS =
  /^(host|content-type|content-length|transfer-encoding|connection|upgrade|expect|te|trailer|keep-alive|proxy-.*|x-custos-.*)$/i;
const HEADER_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$/;
// eslint-disable-next-line no-control-regex
const HEADER_VALUE = /^[^\u0000-\u0008\u000a-\u001f\u007f]{0,4000}$/;
const FHIR_JSON_TYPES = new Set(['application/fhir+json', 'application/json+fhir', 'application/json']);

/** A reason the subscription cannot be activated: it goes to status `error` with this text. */
export class SubscriptionRefusal extends Error {}

/**
 * Reads the parts of a Subscription that Custos acts on. Throws a SubscriptionRefusal whose
 * message becomes `Subscription.error`; the message never quotes the resource's values.
 */
export function parseSubscription(
  projectId: string,
  resource: Record<string, unknown>,
  isResourceType: (t: string) => boolean,
): SubscriptionSpec {
  const id = String(resource.id ?? '');
  const versionId = Number((resource.meta as { versionId?: unknown } | undefined)?.versionId ?? 0);
  const status = typeof resource.status === 'string' ? resource.status : '';
  const channel = (resource.channel ?? {}) as Record<string, unknown>;
  if (channel.type !== 'rest-hook' && channel.type !== 'email')
    throw new SubscriptionRefusal(
      'Only channel.type rest-hook and email are supported by this server (websocket, sms and message are not).',
    );
  const criteria = typeof resource.criteria === 'string' ? resource.criteria.trim() : '';
  const q = criteria.indexOf('?');
  const type = q < 0 ? criteria : criteria.slice(0, q);
  if (!type || !isResourceType(type) || type === 'AuditEvent' || type === 'Subscription')
    throw new SubscriptionRefusal(
      'criteria must be a search on a resource type this server serves, e.g. Observation?code=http://loinc.org|1234-5 (not AuditEvent or Subscription).',
    );
  let query: URLSearchParams;
  try {
    query = new URLSearchParams(q < 0 ? '' : criteria.slice(q + 1));
  } catch {
    throw new SubscriptionRefusal('criteria is not a search string.');
  }
  for (const k of query.keys())
    if (RESULT_PARAMETERS.has(k.split(':')[0]!))
      throw new SubscriptionRefusal(
        `criteria may not use the result parameter ${k.split(':')[0]} (paging, sorting, includes, _id).`,
      );
  const target = channel.type === 'email' ? emailChannel(channel) : restHookChannel(channel);
  const payload = payloadContent(channel);
  return {
    projectId,
    id,
    versionId,
    status,
    type,
    query,
    channel: channel.type,
    ...target,
    payload,
    dataClass: PAYLOAD_CLASS[payload],
    end: endTime(resource),
  };
}

type ChannelTarget = Pick<SubscriptionSpec, 'endpoint' | 'to' | 'headers'>;

/** An email channel: `mailto:` one address; no HTTP headers. */
function emailChannel(channel: Record<string, unknown>): ChannelTarget {
  if (channel.header !== undefined)
    throw new SubscriptionRefusal('channel.header is for rest-hook; an email channel takes none.');
  const to = mailtoAddress(channel.endpoint);
  return { endpoint: new URL(`mailto:${to}`), to, headers: [] };
}

/** A rest-hook channel: an absolute http(s) URL without credentials, and its extra headers. */
function restHookChannel(channel: Record<string, unknown>): ChannelTarget {
  let endpoint: URL;
  try {
    endpoint = new URL(typeof channel.endpoint === 'string' ? channel.endpoint : '');
  } catch {
    throw new SubscriptionRefusal('channel.endpoint must be an absolute https URL.');
  }
  if (
    (endpoint.protocol !== 'https:' && endpoint.protocol !== 'http:') ||
    endpoint.username ||
    endpoint.password
  )
    throw new SubscriptionRefusal('channel.endpoint must be an absolute https URL without credentials.');
  if (endpoint.hash) endpoint.hash = '';
  const headers: [string, string][] = [];
  const rawHeaders = channel.header === undefined ? [] : channel.header;
  if (!Array.isArray(rawHeaders) || rawHeaders.length > 20)
    throw new SubscriptionRefusal('channel.header must be a list of at most 20 "Name: value" strings.');
  for (const [i, h] of rawHeaders.entries()) {
    const s = typeof h === 'string' ? h : '';
    const colon = s.indexOf(':');
    const name = colon > 0 ? s.slice(0, colon).trim() : '';
    const value = colon > 0 ? s.slice(colon + 1).trim() : '';
    if (!HEADER_NAME.test(name) || !HEADER_VALUE.test(value))
      throw new SubscriptionRefusal(`channel.header[${i}] is not a "Name: value" HTTP header.`);
    if (RESERVED_HEADERS.test(name))
      throw new SubscriptionRefusal(`channel.header[${i}] sets a header the server controls.`);
    headers.push([name, value]);
  }
  return { endpoint, headers };
}

function endTime(resource: Record<string, unknown>): number | undefined {
  if (typeof resource.end !== 'string') return undefined;
  const end = Date.parse(resource.end);
  return Number.isNaN(end) ? undefined : end;
}

/** One plain address: no display name, no second recipient, no header fields (`?cc=`, `?subject=`). */
const MAILBOX =
  /^[A-Za-z0-9!#$%&'*+/=^_`{|}~.-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)+$/;

/** The address of an email channel's `mailto:` endpoint (RFC 6068), one mailbox only. */
function mailtoAddress(endpoint: unknown): string {
  const text = typeof endpoint === 'string' ? endpoint.trim() : '';
  const address = /^mailto:/i.test(text) ? decodeURIComponentSafe(text.slice(7)) : undefined;
  if (address === undefined || address.length > 254 || !MAILBOX.test(address))
    throw new SubscriptionRefusal(
      'channel.endpoint of an email channel must be mailto: and one address, e.g. mailto:alerts@example.org (no names, lists or ?subject=).',
    );
  return address.toLowerCase();
}

function decodeURIComponentSafe(s: string): string | undefined {
  try {
    return decodeURIComponent(s);
  } catch {
    return undefined;
  }
}

function payloadContent(channel: Record<string, unknown>): PayloadContent {
  const mime = typeof channel.payload === 'string' ? channel.payload.split(';')[0]!.trim().toLowerCase() : '';
  const ext = ((channel._payload as { extension?: unknown } | undefined)?.extension ?? []) as {
    url?: unknown;
    valueCode?: unknown;
  }[];
  const chosen = Array.isArray(ext)
    ? ext.find((e) => e?.url === PAYLOAD_CONTENT_EXTENSION)?.valueCode
    : undefined;
  if (chosen !== undefined && chosen !== 'empty' && chosen !== 'id-only' && chosen !== 'full-resource')
    throw new SubscriptionRefusal('The payload content extension must be empty, id-only or full-resource.');
  if (!mime) {
    if (chosen !== undefined && chosen !== 'empty')
      throw new SubscriptionRefusal('id-only and full-resource need channel.payload application/fhir+json.');
    return 'empty';
  }
  if (!FHIR_JSON_TYPES.has(mime))
    throw new SubscriptionRefusal('channel.payload must be application/fhir+json, or absent for no payload.');
  return (chosen as PayloadContent | undefined) ?? 'full-resource';
}
