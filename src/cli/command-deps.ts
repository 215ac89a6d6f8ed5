import os from 'node:os';
import type { Config } from '../config/config.ts';
import type { CustosCore } from '../server.ts';

/**
 * What main.ts lends the command modules (vendor, policy, flows, subscription): its configuration,
 * its choice of backend (the running server's admin API, else the storage opened directly), its
 * printing and its exit conventions.
 */
export interface CommandDeps {
  config: () => Config;
  withBackend: <T>(
    cfg: Config,
    viaApi: (call: (p: string, body: unknown) => Promise<unknown>) => Promise<T>,
    direct: (core: CustosCore) => Promise<T>,
  ) => Promise<T>;
  print: (json: boolean, value: unknown, human: string) => void;
  /** An error that exits 2 with this message (usage). */
  usage: (message: string) => Error;
}

/** The operating-system account running the CLI, recorded as who made an administrative change. */
export function whoami(): string {
  try {
    return os.userInfo().username || 'installation-admin';
  } catch {
    return 'installation-admin'; // no account name (some containers)
  }
}
