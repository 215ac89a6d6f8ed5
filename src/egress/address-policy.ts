import { isIP } from 'node:net';

/**
 * Which IP addresses the egress gateway may connect to without an explicit registration (SSRF
 * rules, docs/phi-boundary.md). Only global unicast addresses are "public"; everything in the IANA
 * special-purpose registries is not: loopback, RFC 1918 private networks, link-local (cloud
 * metadata services such as 169.254.169.254 live there), carrier-grade NAT, documentation and
 * benchmarking ranges, multicast, reserved space, unique-local and site-local IPv6. IPv6 forms that
 * embed an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64
 * `64:ff9b::/96`, 6to4 `2002::/16`) are judged by the IPv4 address they carry.
 *
 * https://www.iana.org/assignments/iana-ipv4-special-registry/,
 * https://www.iana.org/assignments/iana-ipv6-special-registry/
 */
export type AddressKind = 'public' | 'loopback' | 'private' | 'link-local' | 'reserved';

const V4_RANGES: [string, number, Exclude<AddressKind, 'public'>][] = [
  ['0.0.0.0', 8, 'reserved'], // "this network"; 0.0.0.0 reaches the local host on Linux
  ['10.0.0.0', 8, 'private'],
  ['100.64.0.0', 10, 'private'], // carrier-grade NAT (RFC 6598)
  ['127.0.0.0', 8, 'loopback'],
  ['169.254.0.0', 16, 'link-local'], // includes 169.254.169.254, the cloud metadata service
  ['172.16.0.0', 12, 'private'],
  ['192.0.0.0', 24, 'reserved'], // IETF protocol assignments
  ['192.0.2.0', 24, 'reserved'], // TEST-NET-1
  ['192.88.99.0', 24, 'reserved'], // 6to4 relay anycast (deprecated)
  ['192.168.0.0', 16, 'private'],
  ['198.18.0.0', 15, 'reserved'], // benchmarking
  ['198.51.100.0', 24, 'reserved'], // TEST-NET-2
  ['203.0.113.0', 24, 'reserved'], // TEST-NET-3
  ['224.0.0.0', 4, 'reserved'], // multicast
  ['240.0.0.0', 4, 'reserved'], // reserved, and 255.255.255.255 broadcast
];

function v4ToInt(a: string): number {
  return a.split('.').reduce((n, p) => n * 256 + Number(p), 0);
}

const V4 = V4_RANGES.map(([base, bits, kind]) => ({
  base: v4ToInt(base),
  size: 2 ** (32 - bits),
  kind,
}));

function kindOfV4(a: string): AddressKind {
  const n = v4ToInt(a);
  for (const r of V4) if (n >= r.base && n < r.base + r.size) return r.kind;
  return 'public';
}

/** An IPv6 address as 8 16-bit words (any textual form of RFC 4291 §2.2). */
function v6Words(a: string): number[] {
  let s = a.toLowerCase().replace(/%.*$/, '');
  const dotted = /(\d+\.\d+\.\d+\.\d+)$/.exec(s);
  if (dotted) {
    const n = v4ToInt(dotted[1]!);
    s = `${s.slice(0, -dotted[1]!.length)}${Math.floor(n / 65536).toString(16)}:${(n % 65536).toString(16)}`;
  }
  const parse = (part: string) => (part === '' ? [] : part.split(':').map((w) => parseInt(w, 16)));
  const gap = s.indexOf('::');
  if (gap < 0) return parse(s);
  const left = parse(s.slice(0, gap));
  const right = parse(s.slice(gap + 2));
  return [...left, ...new Array<number>(8 - left.length - right.length).fill(0), ...right];
}

function kindOfV6(a: string): AddressKind {
  const w = v6Words(a);
  const embedded = () => `${w[6]! >> 8}.${w[6]! & 255}.${w[7]! >> 8}.${w[7]! & 255}`;
  const zeros = (from: number, to: number) => w.slice(from, to).every((x) => x === 0);
  if (zeros(0, 8)) return 'reserved'; // :: unspecified
  if (zeros(0, 7) && w[7] === 1) return 'loopback'; // ::1
  if (zeros(0, 5) && w[5] === 0xffff) return kindOfV4(embedded()); // IPv4-mapped
  if (zeros(0, 6)) return kindOfV4(embedded()) === 'public' ? 'reserved' : kindOfV4(embedded()); // IPv4-compatible
  if (w[0] === 0x64 && w[1] === 0xff9b && zeros(2, 6)) return kindOfV4(embedded()); // NAT64
  if (w[0] === 0x2002) {
    // 6to4: the IPv4 address is in words 1 and 2.
    const v4 = `${w[1]! >> 8}.${w[1]! & 255}.${w[2]! >> 8}.${w[2]! & 255}`;
    return kindOfV4(v4) === 'public' ? 'public' : kindOfV4(v4);
  }
  const first = w[0]!;
  if ((first & 0xfe00) === 0xfc00) return 'private'; // fc00::/7 unique local
  if ((first & 0xffc0) === 0xfe80) return 'link-local'; // fe80::/10
  if ((first & 0xffc0) === 0xfec0) return 'private'; // fec0::/10 site-local (deprecated)
  if ((first & 0xff00) === 0xff00) return 'reserved'; // multicast
  if (first === 0x64 && w[1] === 0xff9b && w[2] === 1) return 'reserved'; // 64:ff9b:1::/48 local NAT64
  if (first === 0x100 && zeros(1, 4)) return 'reserved'; // 100::/64 discard
  if (first === 0x2001 && w[1]! < 0x200) return 'reserved'; // 2001::/23 IETF protocol assignments (Teredo…)
  if (first === 0x2001 && w[1] === 0xdb8) return 'reserved'; // documentation
  if ((first & 0xe000) !== 0x2000) return 'reserved'; // outside 2000::/3, the global unicast space
  return 'public';
}

/** What kind of address `ip` is; `undefined` when it is not an IP address. */
export function addressKind(ip: string): AddressKind | undefined {
  const v = isIP(ip.replace(/%.*$/, ''));
  if (v === 4) return kindOfV4(ip);
  if (v === 6) return kindOfV6(ip);
  return undefined;
}

/**
 * The canonical form of a host as the gateway compares it: lower case, no brackets or trailing
 * dot, IPv4 in dotted decimal whatever form it was written in (`2130706433`, `0x7f.1`, `0177.0.0.1`
 * all become `127.0.0.1`, as the WHATWG URL parser reads them), IPv6 compressed (`::ffff:7f00:1`),
 * international names in punycode. Undefined when it is not a host name.
 */
export function normalizeHost(host: string): string | undefined {
  let h = host.trim();
  if (h === '' || /[\s/?#@\\]/.test(h)) return undefined;
  if (h.startsWith('[') && h.endsWith(']')) h = h.slice(1, -1);
  if (isIP(h) === 6) h = `[${h}]`;
  let parsed: string;
  try {
    parsed = new URL(`https://${h}/`).hostname;
  } catch {
    return undefined;
  }
  parsed = parsed.replace(/^\[(.*)\]$/, '$1').replace(/\.$/, '');
  return parsed === '' ? undefined : parsed;
}
