/**
 * The small part of oidc-provider 9's API that Custos uses. The package ships no types and
 * `@types/oidc-provider` is not a dependency; this declares only what src/auth/ calls, so a change
 * in that surface fails type-checking here. Callback arguments are typed where they are used.
 */
declare module 'oidc-provider' {
  import type { IncomingMessage, ServerResponse } from 'node:http';

  export interface AdapterPayload {
    [key: string]: unknown;
    jti?: string;
    grantId?: string;
    userCode?: string;
    uid?: string;
    consumed?: number;
  }

  export interface Adapter {
    upsert(id: string, payload: AdapterPayload, expiresIn: number | undefined): Promise<void>;
    find(id: string): Promise<AdapterPayload | undefined>;
    findByUserCode(userCode: string): Promise<AdapterPayload | undefined>;
    findByUid(uid: string): Promise<AdapterPayload | undefined>;
    consume(id: string): Promise<void>;
    destroy(id: string): Promise<void>;
    revokeByGrantId(grantId: string): Promise<void>;
  }

  export class Provider {
    constructor(issuer: string, configuration?: Record<string, unknown>);
    readonly issuer: string;
    /** Koa's flag: trust X-Forwarded-Proto / X-Forwarded-Host. */
    proxy: boolean;
    callback(): (req: IncomingMessage, res: ServerResponse) => void;
    on(event: string, listener: (...args: unknown[]) => void): this;
    /** Koa middleware, run around every oidc-provider route. */
    use(middleware: (ctx: KoaContext, next: () => Promise<void>) => Promise<void>): void;
  }

  /** The part of Koa's context our middleware touches. */
  export interface KoaContext {
    status: number;
    body: unknown;
    response: { get(field: string): string };
    remove(field: string): void;
  }

  class OIDCProviderError extends Error {
    error: string;
    status: number;
    statusCode: number;
    expose: boolean;
  }

  export namespace errors {
    class InvalidScope extends OIDCProviderError {
      constructor(description: string, scope?: string);
    }
    class InvalidTarget extends OIDCProviderError {
      constructor(description?: string);
    }
    class InvalidClientAuth extends OIDCProviderError {
      constructor(detail?: string);
    }
  }
}
