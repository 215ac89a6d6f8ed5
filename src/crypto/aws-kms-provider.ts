import {
  CreateKeyCommand,
  DecryptCommand,
  DisableKeyCommand,
  EncryptCommand,
  KMSClient,
  ScheduleKeyDeletionCommand,
  type KMSClientConfig,
} from '@aws-sdk/client-kms';
import { FetchHttpHandler } from '@smithy/fetch-http-handler';
import { EgressGateway, egressFetch } from '../egress/egress.ts';
import { kmsVendor } from '../egress/infrastructure.ts';
import type { Logger } from '../log/logger.ts';
import { KeyProviderError, type KeyProvider, type KeyProviderErrorCode } from './key-provider.ts';

/**
 * The `aws-kms` key provider: each KEK is a symmetric AWS KMS key (SYMMETRIC_DEFAULT, created by
 * CreateKey; the handle is its ARN), used through the official AWS SDK v3 client.
 *
 * wrap = Encrypt of the data key with the encryption context `{ "custos:aad": base64(aad) }`;
 * unwrap = Decrypt with the same KeyId and context. KMS authenticates the encryption context as AAD
 * of its own AES-GCM, so a different `aad` fails (InvalidCiphertextException → `integrity`).
 *
 * destroyKek = DisableKey (effective at once: every later Encrypt/Decrypt fails) then
 * ScheduleKeyDeletion with KMS's minimum window, 7 days. KMS cannot delete a key sooner, and until
 * the deletion date a principal allowed `kms:CancelKeyDeletion` and `kms:EnableKey` can bring it
 * back: docs/keys.md says how to deny that in the key policy.
 *
 * Every request leaves through the egress port (`egressFetch`, purpose `aws-kms`): the SDK gets a
 * FetchHttpHandler whose fetch is egress's, redirects refused. Credentials must be given: the SDK's
 * default chain would reach the instance metadata service, STS or SSO over its own connections.
 *
 * @example
 * ```ts
 * const kms = openAwsKmsProvider({
 *   region: 'eu-west-1',
 *   credentials: { accessKeyId, secretAccessKey },
 * });
 * const handle = await kms.createKek('project-a.epoch-1');
 * ```
 */
export interface AwsKmsProviderOptions {
  region: string;
  /** Endpoint URL; default the SDK's for `region` (https://kms.REGION.amazonaws.com). http is allowed for loopback only. */
  endpoint?: string;
  credentials: NonNullable<KMSClientConfig['credentials']>;
  /** Per-attempt timeout, default 10 s. */
  requestTimeoutMs?: number;
  /** Attempts per call including retries (SDK standard retry mode), default 3. */
  maxAttempts?: number;
  /** Where egress logs each request's destination host. */
  log?: Logger;
  /** The egress gateway (default: one that knows only this KMS endpoint, as infrastructure). */
  egress?: EgressGateway;
}

/** The encryption-context key under which the AAD is bound. */
export const KMS_AAD_CONTEXT_KEY = 'custos:aad';
/** KMS's shortest deletion window. */
const PENDING_WINDOW_DAYS = 7;
const KEY_BYTES = 32;
const MAX_AAD_BYTES = 4096;
const KEY_ID = /^[A-Za-z0-9._:/-]{1,128}$/;
/** A key ARN or a bare key id (UUID or mrk-…); never an alias, which could point anywhere later. */
const HANDLE = /^(?:arn:aws[a-z-]*:kms:[a-z0-9-]{1,32}:\d{12}:key\/)?(?:mrk-)?[A-Za-z0-9-]{1,64}$/;

const KMS_CODES: Record<string, KeyProviderErrorCode> = {
  NotFoundException: 'unknown_key',
  InvalidArnException: 'unknown_key',
  InvalidCiphertextException: 'integrity',
  IncorrectKeyException: 'integrity',
  DisabledException: 'destroyed',
  KMSInvalidStateException: 'destroyed',
  KeyUnavailableException: 'unavailable',
  DependencyTimeoutException: 'unavailable',
  KMSInternalException: 'unavailable',
  ThrottlingException: 'unavailable',
  LimitExceededException: 'unavailable',
  AccessDeniedException: 'misconfigured',
  UnrecognizedClientException: 'misconfigured',
  InvalidSignatureException: 'misconfigured',
  IncompleteSignature: 'misconfigured',
  MissingAuthenticationTokenException: 'misconfigured',
  ExpiredTokenException: 'misconfigured',
  InvalidKeyUsageException: 'misconfigured',
  ValidationException: 'misconfigured',
};

function fail(code: KeyProviderErrorCode, message: string): never {
  throw new KeyProviderError(code, message);
}

/** The service's error name when `e` is a KMS error response; undefined for network failures. */
function serviceErrorName(e: unknown): string | undefined {
  const o = e as { $fault?: unknown; name?: unknown } | null;
  if (!o || typeof o !== 'object' || (o.$fault !== 'client' && o.$fault !== 'server')) return undefined;
  return typeof o.name === 'string' && /^[A-Za-z]{1,64}$/.test(o.name) ? o.name : 'UnknownError';
}

function mapError(op: string, e: unknown): KeyProviderError {
  if (e instanceof KeyProviderError) return e;
  const name = serviceErrorName(e);
  // No response at all (refused, reset, DNS, timeout): the SDK's message may hold the URL; ours does not.
  if (name === undefined)
    return new KeyProviderError('unavailable', `AWS KMS ${op} failed: KMS is unreachable`);
  const fault = (e as { $fault: string }).$fault;
  const code = KMS_CODES[name] ?? (fault === 'server' ? 'unavailable' : 'misconfigured');
  return new KeyProviderError(code, `AWS KMS ${op} failed (${name})`);
}

function checkEndpoint(endpoint: string): void {
  let u: URL;
  try {
    u = new URL(endpoint);
  } catch {
    fail('misconfigured', 'AWS KMS endpoint is not a URL');
  }
  const loopback = u.hostname === 'localhost' || u.hostname === '[::1]' || /^127\./.test(u.hostname);
  if (u.protocol !== 'https:' && !(u.protocol === 'http:' && loopback)) {
    fail('misconfigured', 'AWS KMS endpoint must be https (http only on loopback)');
  }
}

/** A KeyProvider on AWS KMS (or anything speaking its JSON 1.1 protocol at `endpoint`). */
export class AwsKmsProvider implements KeyProvider {
  readonly kind = 'aws-kms' as const;
  readonly #client: KMSClient;
  #closed = false;

  constructor(opts: AwsKmsProviderOptions) {
    if (typeof opts.region !== 'string' || !/^[a-z0-9-]{1,32}$/.test(opts.region)) {
      fail('misconfigured', 'AWS KMS region is missing or malformed');
    }
    if (opts.endpoint !== undefined) checkEndpoint(opts.endpoint);
    if (!opts.credentials) fail('misconfigured', 'AWS KMS credentials are missing');
    const egress =
      opts.egress ?? EgressGateway.of([kmsVendor(opts.region, opts.endpoint)], { log: opts.log });
    const viaEgress = async (input: RequestInfo | URL, init?: RequestInit): Promise<Response> => {
      const req = input instanceof Request ? input : new Request(input, init);
      const body =
        req.method === 'GET' || req.method === 'HEAD' ? undefined : Buffer.from(await req.arrayBuffer());
      return egressFetch(egress, {
        purpose: 'aws-kms',
        // Wrapped data keys and key ids: no PHI (ADR 0009).
        dataClass: 'none',
        url: req.url,
        init: { method: req.method, headers: req.headers, body, signal: req.signal, redirect: 'error' },
      });
    };
    this.#client = new KMSClient({
      region: opts.region,
      ...(opts.endpoint !== undefined ? { endpoint: opts.endpoint } : {}),
      credentials: opts.credentials,
      // 'standard' never probes the instance metadata service (the 'auto' mode would, outside egress).
      defaultsMode: 'standard',
      maxAttempts: opts.maxAttempts ?? 3,
      requestHandler: new FetchHttpHandler({
        requestTimeout: opts.requestTimeoutMs ?? 10_000,
        customFetch: viaEgress as typeof fetch,
      }),
    });
  }

  async createKek(keyId: string): Promise<string> {
    this.#ready();
    if (!KEY_ID.test(keyId)) throw new RangeError('keyId must be 1–128 characters of [A-Za-z0-9._:/-]');
    try {
      const out = await this.#client.send(
        new CreateKeyCommand({
          KeySpec: 'SYMMETRIC_DEFAULT',
          KeyUsage: 'ENCRYPT_DECRYPT',
          Description: `Custos KEK ${keyId}`,
          Tags: [{ TagKey: 'custos:key-id', TagValue: keyId }],
        }),
      );
      const arn = out.KeyMetadata?.Arn;
      if (!arn || !HANDLE.test(arn)) fail('unavailable', 'AWS KMS CreateKey returned no key ARN');
      return arn;
    } catch (e) {
      throw mapError('CreateKey', e);
    }
  }

  async wrap(handle: string, dataKey: Buffer, aad: Buffer): Promise<Buffer> {
    this.#ready();
    if (!Buffer.isBuffer(dataKey) || dataKey.length !== KEY_BYTES) {
      throw new RangeError('data key must be a 32-byte Buffer');
    }
    this.#checkHandle(handle);
    try {
      const out = await this.#client.send(
        new EncryptCommand({ KeyId: handle, Plaintext: dataKey, EncryptionContext: context(aad) }),
      );
      if (!out.CiphertextBlob) fail('unavailable', 'AWS KMS Encrypt returned no ciphertext');
      return Buffer.from(out.CiphertextBlob);
    } catch (e) {
      throw mapError('Encrypt', e);
    }
  }

  async unwrap(handle: string, wrapped: Buffer, aad: Buffer): Promise<Buffer> {
    this.#ready();
    this.#checkHandle(handle);
    try {
      const out = await this.#client.send(
        new DecryptCommand({ KeyId: handle, CiphertextBlob: wrapped, EncryptionContext: context(aad) }),
      );
      const plain = out.Plaintext;
      if (!plain || plain.length !== KEY_BYTES) {
        plain?.fill(0);
        fail('integrity', 'AWS KMS Decrypt returned a plaintext that is not a data key');
      }
      const key = Buffer.from(plain);
      plain.fill(0);
      return key;
    } catch (e) {
      throw mapError('Decrypt', e);
    }
  }

  async destroyKek(handle: string): Promise<void> {
    this.#ready();
    this.#checkHandle(handle);
    // Disable first: it takes effect at once, and KMS refuses DisableKey once deletion is pending.
    try {
      await this.#client.send(new DisableKeyCommand({ KeyId: handle }));
    } catch (e) {
      // KMSInvalidState: already pending deletion (destroyed before); go on to make sure of the schedule.
      if (serviceErrorName(e) !== 'KMSInvalidStateException') throw mapError('DisableKey', e);
    }
    try {
      await this.#client.send(
        new ScheduleKeyDeletionCommand({ KeyId: handle, PendingWindowInDays: PENDING_WINDOW_DAYS }),
      );
    } catch (e) {
      if (serviceErrorName(e) !== 'KMSInvalidStateException') throw mapError('ScheduleKeyDeletion', e);
    }
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#client.destroy();
  }

  #ready(): void {
    if (this.#closed) fail('unavailable', 'key provider is closed');
  }

  #checkHandle(handle: string): void {
    if (typeof handle !== 'string' || !HANDLE.test(handle)) fail('unknown_key', 'not an AWS KMS key handle');
  }
}

function context(aad: Buffer): Record<string, string> {
  if (!Buffer.isBuffer(aad) || aad.length === 0 || aad.length > MAX_AAD_BYTES) {
    throw new RangeError(`aad must be a Buffer of 1–${MAX_AAD_BYTES} bytes for AWS KMS`);
  }
  return { [KMS_AAD_CONTEXT_KEY]: aad.toString('base64') };
}

/** Builds the provider; no request is made until the first call. */
export function openAwsKmsProvider(opts: AwsKmsProviderOptions): AwsKmsProvider {
  return new AwsKmsProvider(opts);
}
