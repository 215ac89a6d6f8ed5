import nodemailer from 'nodemailer';
import { egressConnectTls, type EgressGateway } from './egress.ts';
import type { DataClass } from './vendor-registry.ts';

/**
 * E-mail through the egress gateway (docs/phi-boundary.md, "E-mail"). Nodemailer speaks SMTP; the
 * socket under it is opened by the gateway (`egressConnectTls`), so a message goes out only to the
 * configured relay, only when the relay is a registered vendor endpoint (protocol `tls`) whose BAA
 * covers the data class of the message, over TLS 1.2+ with the certificate verified, and each
 * connection is audited with that class before anything is sent.
 *
 * The relay is reached by implicit TLS (SMTPS, RFC 8314 §3.3, port 465 by default), never STARTTLS:
 * with STARTTLS the first bytes, and with a misconfigured relay the whole session, would travel in
 * clear text, and a stripping attacker could keep it that way. The recipient's own mail server is
 * the relay's business: the relay is the vendor the BAA names, so it is where PHI is disclosed.
 *
 * Nodemailer is told to log nothing (its debug log carries message bodies), and each message uses a
 * connection of its own (no pool): notifications are few, and a pooled connection would outlive the
 * audit event that allowed it.
 */

export interface SmtpRelay {
  /** The relay's DNS name or address, as registered in the vendor registry. */
  host: string;
  port: number;
  /** The envelope and header sender. */
  from: string;
  user?: string;
  password?: string;
  /** PEM certificates to trust instead of Node's bundled roots (a private CA). */
  ca?: string | Buffer;
  /** The domains (and their subdomains) that messages carrying PHI may be addressed to. */
  recipientDomains: readonly string[];
}

export interface MailMessage {
  to: string;
  subject: string;
  text: string;
  /** Extra header fields (no CR or LF in names or values). */
  headers?: Record<string, string>;
  attachments?: { filename: string; contentType: string; content: string }[];
}

export interface MailContext {
  /** The egress purpose code, e.g. `subscription`. */
  purpose: string;
  /** The class of data the message carries (subject, body and attachments together). */
  dataClass: DataClass;
  requestId?: string;
  projectId?: string;
  /** For the egress audit event: whose data the message carries, under which purpose of use. */
  patients?: string[];
  purposeOfUse?: string;
  /** For the egress audit event: the domain of the recipient the relay passes the message to. */
  recipient?: string;
  /** Connect, greeting and each command's answer give up after this long. */
  timeoutMs: number;
  signal?: AbortSignal;
}

/** A failure the relay answered with (`SMTP 550`), or a connection error's code. */
export class SmtpError extends Error {
  constructor(
    readonly code: string,
    readonly responseCode: number | undefined,
  ) {
    super(responseCode ? `SMTP ${responseCode}` : code);
    this.name = 'SmtpError';
  }
}

/** The domain part of an address (lower case). */
export function recipientDomain(address: string): string {
  return address.slice(address.lastIndexOf('@') + 1).toLowerCase();
}

export class SmtpMailer {
  constructor(
    private readonly egress: EgressGateway,
    readonly relay: Readonly<SmtpRelay>,
  ) {}

  /**
   * Whether a message of `dataClass` may be addressed to `address`: anything without PHI may; PHI
   * only to the listed domains and their subdomains (the relay's BAA covers the relay, not the
   * mailbox a subscriber names).
   */
  recipientAllowed(address: string, dataClass: DataClass): boolean {
    if (dataClass === 'none' || dataClass === 'deidentified') return true;
    const domain = recipientDomain(address);
    return this.relay.recipientDomains.some((d) => domain === d || domain.endsWith(`.${d}`));
  }

  /** Sends one message; resolves when the relay has accepted it (250 after DATA). */
  async send(message: MailMessage, ctx: MailContext): Promise<void> {
    const { host, port } = this.relay;
    // One limit for the whole attempt (connect, each command, DATA) and the worker's stop: the
    // per-step timeouts alone would let a slow relay stretch an attempt past its claim.
    const signal = AbortSignal.any([AbortSignal.timeout(ctx.timeoutMs), ...(ctx.signal ? [ctx.signal] : [])]);
    const transport = nodemailer.createTransport({
      host,
      port,
      secure: true,
      logger: false,
      debug: false,
      auth: this.relay.user ? { user: this.relay.user, pass: this.relay.password ?? '' } : undefined,
      connectionTimeout: ctx.timeoutMs,
      greetingTimeout: ctx.timeoutMs,
      socketTimeout: ctx.timeoutMs,
      // The gateway opens (and audits) the TLS connection; nodemailer only talks over it.
      getSocket: (_options, callback) => {
        egressConnectTls(this.egress, {
          purpose: ctx.purpose,
          dataClass: ctx.dataClass,
          host,
          port,
          ca: this.relay.ca,
          timeoutMs: ctx.timeoutMs,
          signal,
          requestId: ctx.requestId,
          projectId: ctx.projectId,
          patients: ctx.patients,
          purposeOfUse: ctx.purposeOfUse,
          recipient: ctx.recipient,
        }).then(
          (socket) => callback(null, { connection: socket, secured: true }),
          (e: unknown) => callback(e as Error),
        );
      },
    });
    try {
      await transport.sendMail({
        signal,
        from: this.relay.from,
        to: message.to,
        subject: message.subject,
        text: message.text,
        headers: message.headers,
        attachments: message.attachments,
        disableFileAccess: true,
        disableUrlAccess: true,
      });
    } catch (e) {
      // The egress gateway's refusals (CustosError) and socket errors pass through; SMTP answers
      // become an SmtpError carrying the reply code only (the reply text may quote the message).
      const err = e as { responseCode?: unknown; code?: unknown; name?: unknown };
      if (typeof err.responseCode === 'number')
        throw new SmtpError(typeof err.code === 'string' ? err.code : 'SMTP', err.responseCode);
      throw e;
    } finally {
      transport.close();
    }
  }
}
