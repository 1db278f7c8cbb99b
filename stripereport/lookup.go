package stripereport

import "strings"

// Lookup keys of the prices the catalog sync creates for a tier.
const (
	lookupPrefix     = "am_"
	lookupSuffixBase = "_base"
	lookupSuffixUse  = "_usage"
)

// BaseLookupKey is the lookup key of a tier's flat base price.
func BaseLookupKey(tier string) string { return lookupPrefix + tier + lookupSuffixBase }

// UsageLookupKey is the lookup key of a tier's metered overage price.
func UsageLookupKey(tier string) string { return lookupPrefix + tier + lookupSuffixUse }

// MeterUsageLookupKey is the lookup key of a tier's metered overage price
// of another meter than the default one: am_<tier>_<meter>_usage.
func MeterUsageLookupKey(tier, meter string) string {
	return lookupPrefix + tier + "_" + meter + lookupSuffixUse
}

// TierOfLookupKey returns the tier a price lookup key names: the tier of
// a key BaseLookupKey or UsageLookupKey made, otherwise the key itself (so
// prices made by hand can use the tier's name as lookup key).
func TierOfLookupKey(key string) string {
	if rest, ok := strings.CutPrefix(key, lookupPrefix); ok {
		for _, s := range []string{lookupSuffixBase, lookupSuffixUse} {
			if tier, ok := strings.CutSuffix(rest, s); ok && tier != "" {
				return tier
			}
		}
	}
	return key
}
